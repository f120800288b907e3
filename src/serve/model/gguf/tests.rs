use std::path::Path;

use super::writer::{quantize, strings, GgufWriter};
use super::*;

/// A small valid file: two metadata entries, an F32 vector and a Q8_0 matrix.
fn small() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("qwen2".into()))
        .kv("general.name", Value::String("t".into()))
        .kv("list", strings(&["a", "b c"]))
        .tensor(
            "v",
            &[4],
            0,
            quantize(GgmlType::F32, &[1.0, 2.0, 3.0, 4.0]).unwrap(),
        )
        .tensor(
            "w",
            &[32, 2],
            8,
            quantize(
                GgmlType::Q8_0,
                &(0..64).map(|i| i as f32 - 32.0).collect::<Vec<_>>(),
            )
            .unwrap(),
        );
    w
}

fn open(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(Path::new("m.gguf"), SharedBytes::from_vec(bytes))
}

fn err(bytes: Vec<u8>) -> String {
    open(bytes).unwrap_err().to_string()
}

#[test]
fn reads_metadata_tensors_and_alignment() {
    let bytes = small().to_bytes();
    let f = open(bytes.clone()).unwrap();
    let h = f.header();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(h.data_offset % 32, 0);
    assert_eq!(f.str("general.architecture").unwrap(), "qwen2");
    assert_eq!(
        f.array("list").unwrap(),
        &[Value::String("a".into()), Value::String("b c".into())]
    );
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensors[1].dims, vec![32, 2]);
    // The vector (16 bytes) is padded to the 32-byte alignment before the matrix.
    assert_eq!(h.tensors[1].offset, 32);
    let (ty, dims, data) = f.tensor("v").unwrap();
    assert_eq!((ty, dims), (GgmlType::F32, vec![4]));
    assert_eq!(&data[..4], &1f32.to_le_bytes());
    let (ty, dims, data) = f.tensor("w").unwrap();
    assert_eq!((ty, dims, data.len()), (GgmlType::Q8_0, vec![32, 2], 68));
    assert_eq!(bytes.len() as u64, h.data_offset + 32 + 68);
    assert_eq!(
        f.str("general.nope").unwrap_err().to_string(),
        "metadata \"general.nope\": missing"
    );
    assert_eq!(
        f.usize("general.name").unwrap_err().to_string(),
        "metadata \"general.name\": expected a non-negative integer, found string"
    );
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = small();
    w.kv("general.alignment", Value::U32(64));
    let f = open(w.to_bytes()).unwrap();
    assert_eq!(f.header().alignment, 64);
    assert_eq!(f.header().data_offset % 64, 0);
    assert_eq!(f.header().tensors[1].offset, 64);
    let mut w = small();
    w.kv("general.alignment", Value::U32(48));
    assert_eq!(
        err(w.to_bytes()),
        "metadata \"general.alignment\": U32(48) is not a power of two"
    );
}

#[test]
fn not_gguf_and_versions() {
    let mut b = small().to_bytes();
    b[..4].copy_from_slice(b"GGML");
    assert_eq!(err(b), "not a GGUF file (first bytes 47 47 4d 4c)");
    let mut b = small().to_bytes();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(err(b), "GGUF version 1 is not supported (supported: 2, 3)");
    let mut b = small().to_bytes();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_eq!(
        err(b),
        "GGUF version 50331648 is not supported (supported: 2, 3); the file looks big-endian"
    );
    assert_eq!(
        err(b"GG".to_vec()),
        "file is truncated: it ends at byte 2 while reading the magic number"
    );
}

#[test]
fn truncated_header_names_what_was_being_read() {
    let b = small().to_bytes();
    // magic 4 + version 4 + counts 16, key "general.architecture" (8 + 20), type 4, then the
    // value's length (8) and 5 bytes: cut inside "qwen2".
    let cut = 4 + 4 + 16 + 8 + 20 + 4 + 8 + 3;
    assert_eq!(
        err(b[..cut].to_vec()),
        format!("file is truncated: it ends at byte {cut} while reading the value of metadata \"general.architecture\" (5 bytes)")
    );
    // Inside the tensor table: the count check sees the table cannot be whole.
    assert_eq!(
        err(b[..197].to_vec()),
        "corrupt header at byte 150: 2 tensor infos cannot fit in the 47 bytes left (truncated or corrupt file)"
    );
}

#[test]
fn truncated_data_is_reported_per_tensor() {
    let b = small().to_bytes();
    let len = b.len();
    let f = open(b[..len - 10].to_vec()).unwrap();
    assert_eq!(
        f.tensor("w").unwrap_err().to_string(),
        format!(
            "file is truncated: tensor \"w\" ends at byte {len} but the file has {} bytes",
            len - 10
        )
    );
    // Tensors before the cut are intact.
    assert!(f.tensor("v").is_ok());
}

#[test]
fn corrupt_counts_types_and_tensor_infos() {
    let mut b = small().to_bytes();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let rest = b.len() - 24;
    assert_eq!(
        err(b),
        format!("corrupt header at byte 24: 18446744073709551615 metadata entries cannot fit in the {rest} bytes left (truncated or corrupt file)")
    );
    let mut b = small().to_bytes();
    // The value type of the first entry (after the 28-byte key).
    let at = 24 + 28;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert_eq!(
        err(b),
        format!("corrupt header at byte {at}: metadata \"general.architecture\" has unknown value type 99")
    );
    let mut w = GgufWriter::new();
    w.kv("k", Value::Array(vec![Value::U32(1)]));
    let mut b = w.to_bytes();
    // Claim 2^40 u32 elements.
    let at = 24 + 9 + 4 + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(
        err(b).contains("1099511627776 elements of metadata \"k\" cannot fit in the"),
        "huge array counts are refused before allocating"
    );
    let mut w = GgufWriter::new();
    w.tensor("a", &[32], 0, vec![0; 128])
        .tensor("a", &[32], 0, vec![0; 128]);
    assert!(err(w.to_bytes()).ends_with("tensor \"a\" appears twice"));
    let mut w = GgufWriter::new();
    w.tensor("z", &[0, 4], 0, vec![]);
    assert!(err(w.to_bytes()).ends_with("tensor \"z\" has dimensions [0, 4]"));
}

#[test]
fn unsupported_and_malformed_tensors() {
    let mut w = GgufWriter::new();
    w.tensor("q4", &[32, 1], 2, vec![0; 18])
        .tensor("odd", &[48, 1], 8, vec![0; 51])
        .tensor("mystery", &[32], 200, vec![0; 4]);
    let f = open(w.to_bytes()).unwrap();
    assert_eq!(
        f.tensor("q4").unwrap_err().to_string(),
        "tensor \"q4\" has type Q4_0 (ggml type 2), which is not supported (supported: F32, Q4_K, Q5_0, Q6_K, Q8_0)"
    );
    assert_eq!(
        f.tensor("odd").unwrap_err().to_string(),
        "tensor \"odd\": rows of 48 elements are not whole Q8_0 blocks of 32"
    );
    assert_eq!(
        f.tensor("mystery").unwrap_err().to_string(),
        "tensor \"mystery\" has type ggml type 200, which is not supported (supported: F32, Q4_K, Q5_0, Q6_K, Q8_0)"
    );
    assert_eq!(
        f.tensor("nope").unwrap_err().to_string(),
        "missing tensor \"nope\""
    );
}

#[test]
fn every_truncation_of_a_file_is_an_error_not_a_panic() {
    let b = small().to_bytes();
    for cut in 0..b.len() {
        if let Ok(f) = open(b[..cut].to_vec()) {
            // Header complete: the data check must catch the missing bytes.
            assert!(f.tensor("w").is_err(), "cut at {cut}");
        }
    }
}
