//! Issue 11 item 4 (EPP part), measured in process: peak heap allocated while inspecting a body
//! whose `stream` is a 15 MB array, with today's borrowed parse against the previous approach
//! (`stream` deserialised as a `serde_json::Value`) on the same body in the same run. One test
//! in this binary, so the counting allocator sees nothing else.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Deserialize;
use switchyard::epp::request::{inspect, ApiType};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated on top of what was live when `f` started.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - base)
}

/// How the EPP read `stream` before the fix.
#[derive(Deserialize)]
struct ValueStream {
    #[serde(default)]
    #[allow(dead_code)]
    stream: Option<serde_json::Value>,
}

#[test]
fn stream_array_is_read_without_allocating() {
    let mut body = br#"{"model":"m","prompt":"hello","stream":["#.to_vec();
    let n = 15 << 19; // 7.5 M elements, 15 MB
    body.reserve(n * 2 + 2);
    for i in 0..n {
        if i > 0 {
            body.push(b',');
        }
        body.push(b'0');
    }
    body.extend_from_slice(b"]}");

    let (inspected, now) = peak_during(|| {
        let got = inspect(&body, ApiType::Completions).unwrap();
        (got.model.to_string(), got.stream, got.prompt.to_vec())
    });
    assert_eq!(inspected, ("m".to_string(), false, b"hello".to_vec()));

    let (parsed, before) = peak_during(|| serde_json::from_slice::<ValueStream>(&body).map(|_| ()));
    parsed.unwrap();
    println!(
        "{}-byte body: peak heap while inspecting {} bytes now, {} MiB with stream as a Value",
        body.len(),
        now,
        before >> 20
    );
    // Before: 7.5 M `Value`s of 32 bytes plus the vector growth, ~240+ MiB.
    assert!(before > 200 << 20, "baseline only {before} bytes?");
    assert!(now < 64 << 10, "inspect allocated {now} bytes at peak");
}
