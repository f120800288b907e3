#!/usr/bin/env python3
"""Sorts `perf record -g` samples of the EPP into cost categories: a sample counts in every
category one of its frames matches (so categories overlap; indented ones are parts of the one
above). Usage: perf-categories.py PERF_DATA"""
import collections
import re
import subprocess
import sys

CATEGORIES = [
    ("worker park/unpark (epoll wait, context switch)", r"Context::park|park_internal|park_timeout"),
    ("tonic HTTP/2 connection task", r"serve_connection"),
    ("ext_proc stream (state machine and its transport)", r"serve_stream|extproc::stream|Replies"),
    ("  state machine (on_message)", r"StreamState::on_message"),
    ("    director.route", r"Director::route"),
    ("      request body inspection", r"request::inspect"),
    ("      scheduling (filters, scorers, picker)", r"Scheduler::schedule"),
    ("      prefix hash/match/record", r"PrefixIndex|epp::prefix::"),
    ("    response side (usage, sizes)", r"on_response_"),
    ("    metrics (prometheus-client)", r"prometheus_client"),
    ("  mpsc reply channel", r"mpsc|chan::"),
    ("task spawn", r"task::spawn|spawn_inner"),
    ("cross-thread wake-ups (futex)", r"futex_wake|Unparker|unpark"),
    ("TCP send", r"writev|sendmsg|tcp_sendmsg"),
    ("TCP receive", r"recvmsg|readv|tcp_recvmsg"),
    ("metrics scraping (poller + HTTP client)", r"epp::scrape|Scraper|promtext|hyper_util::client"),
    ("tracing", r"tracing::|tracing_core"),
]


def samples(path):
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "comm,tid,ip,sym"],
        capture_output=True, text=True, check=True,
    ).stdout
    cur = None
    for line in out.split("\n"):
        if not line.strip():
            if cur:
                yield cur
            cur = None
        elif line[0] in " \t":
            if cur is not None:
                parts = line.split(None, 1)
                cur.append(parts[1] if len(parts) > 1 else parts[0])
        else:
            cur = []
    if cur:
        yield cur


def main():
    pats = [(name, re.compile(p)) for name, p in CATEGORIES]
    counts = collections.Counter()
    total = 0
    for frames in samples(sys.argv[1]):
        total += 1
        for name, p in pats:
            if any(p.search(f) for f in frames):
                counts[name] += 1
    print(f"{total} samples")
    for name, _ in pats:
        print(f"{100 * counts[name] / max(total, 1):6.1f}%  {name}")


if __name__ == "__main__":
    main()
