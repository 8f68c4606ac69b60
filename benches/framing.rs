//! The hot path in isolation: request framing + classification, and reply framing.
//!
//! Run: `cargo bench --bench framing` (add `-- --quick` for a short run). Criterion reports
//! time per command (throughput in elements = commands or replies); before that, a counting
//! global allocator checks that framing a pipelined buffer allocates nothing once the
//! parser is warm, and the counts (plus a rough ns/command of our own) go to
//! `results/framing.md`. A passthrough case that allocates in steady state fails the bench.
//!
//! What is measured is exactly what a session does per read: `RequestParser::parse` on the
//! unconsumed tail, `policy::classify` on the parsed command; `ReplyScanner::next` on the
//! reply tail. Socket I/O, queueing and the invalidation engine are not included (the
//! `passthrough` bench measures the whole proxy).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::{Criterion, Throughput};
use stormwall::config::LimitsConfig;
use stormwall::policy::{self, Kind};
use stormwall::resp::reply::ReplyScanner;
use stormwall::resp::request::{Command, Parsed, RequestLimits, RequestParser};

use common::{cpu_model, results_dir, utc_date};

/// Counts every allocation (and reallocation) made by the process.
struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The size of one read in the session (`session::READ_BUF`): a frame larger than this
/// always arrives in pieces, and the parser resumes where it stopped.
const READ: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------
// Inputs

fn key(i: usize) -> Vec<u8> {
    format!("account:{i:06}:settings").into_bytes()
}

fn value(len: usize, i: usize) -> Vec<u8> {
    (0..len).map(|j| b'a' + ((i + j) % 26) as u8).collect()
}

/// One pipelined buffer of `n` commands made by `make(i)`.
fn pipeline(n: usize, make: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    (0..n).flat_map(make).collect()
}

struct Case {
    name: &'static str,
    buf: Vec<u8>,
    /// Commands (or replies) in `buf`.
    count: usize,
    /// Frames arrive in reads of at most this many bytes (`usize::MAX`: all at once).
    read: usize,
    /// Must allocate nothing in steady state (false only for inline commands, whose
    /// arguments are copied out by design).
    zero_alloc: bool,
}

/// A case of `n` frames made by `make(i)`, which must allocate nothing in steady state.
fn case(name: &'static str, n: usize, make: &dyn Fn(usize) -> Vec<u8>, read: usize) -> Case {
    Case {
        name,
        buf: pipeline(n, make),
        count: n,
        read,
        zero_alloc: true,
    }
}

fn request_cases() -> Vec<Case> {
    let get = |i: usize| common::resp_command(&[b"GET", &key(i)]);
    let set16 = |i: usize| common::resp_command(&[b"SET", &key(i), &value(16, i)]);
    let set16k = |i: usize| common::resp_command(&[b"SET", &key(i), &value(16 * 1024, i)]);
    let mget = |i: usize| {
        let keys: Vec<Vec<u8>> = (0..10).map(|k| key(i * 10 + k)).collect();
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(keys.iter().map(|k| k.as_slice()));
        common::resp_command(&args)
    };
    let del = |i: usize| common::resp_command(&[b"DEL", &key(i), &key(i + 1), &key(i + 2)]);
    let mixed = move |i: usize| match i % 10 {
        0..=5 => get(i),
        6 | 7 => set16(i),
        8 => mget(i),
        _ => del(i),
    };
    vec![
        case("GET (pipeline of 1000)", 1000, &get, usize::MAX),
        case(
            "SET 16 B value (pipeline of 1000)",
            1000,
            &set16,
            usize::MAX,
        ),
        case("SET 16 KiB value (pipeline of 64)", 64, &set16k, usize::MAX),
        case(
            "SET 16 KiB value, arriving in 16 KiB reads",
            64,
            &set16k,
            READ,
        ),
        case("MGET 10 keys (pipeline of 1000)", 1000, &mget, usize::MAX),
        case("DEL 3 keys (pipeline of 1000)", 1000, &del, usize::MAX),
        case(
            "mixed 60% GET / 20% SET / 10% MGET / 10% DEL (1000)",
            1000,
            &mixed,
            usize::MAX,
        ),
        case("mixed, arriving in 16 KiB reads (1000)", 1000, &mixed, READ),
        Case {
            name: "inline `GET key` (telnet style; args copied by design)",
            buf: pipeline(1000, |i| {
                let mut l = b"GET ".to_vec();
                l.extend(key(i));
                l.extend_from_slice(b"\r\n");
                l
            }),
            count: 1000,
            read: usize::MAX,
            zero_alloc: false,
        },
    ]
}

fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

fn reply_cases() -> Vec<Case> {
    let mget = |i: usize| {
        let mut out = b"*10\r\n".to_vec();
        for k in 0..10 {
            if k % 4 == 3 {
                out.extend_from_slice(b"$-1\r\n");
            } else {
                out.extend(bulk(&value(16, i + k)));
            }
        }
        out
    };
    let hgetall3 = |i: usize| {
        let mut out = b"%3\r\n".to_vec();
        for f in 0..3 {
            out.extend(bulk(format!("field{f}").as_bytes()));
            out.extend(bulk(&value(16, i + f)));
        }
        out
    };
    let mixed = move |i: usize| match i % 10 {
        0..=3 => bulk(&value(16, i)),
        4 => b"$-1\r\n".to_vec(),
        5..=7 => b"+OK\r\n".to_vec(),
        8 => mget(i),
        _ => b":3\r\n".to_vec(),
    };
    vec![
        case("+OK (SET)", 1000, &|_| b"+OK\r\n".to_vec(), usize::MAX),
        case(
            "16 B bulk (GET hit)",
            1000,
            &|i| bulk(&value(16, i)),
            usize::MAX,
        ),
        case(
            "null bulk (GET miss)",
            1000,
            &|_| b"$-1\r\n".to_vec(),
            usize::MAX,
        ),
        case(
            "16 KiB bulk (GET hit)",
            64,
            &|i| bulk(&value(16 * 1024, i)),
            usize::MAX,
        ),
        case(
            "16 KiB bulk, arriving in 16 KiB reads",
            64,
            &|i| bulk(&value(16 * 1024, i)),
            READ,
        ),
        case("integer (DEL)", 1000, &|_| b":3\r\n".to_vec(), usize::MAX),
        case("array of 10 bulks (MGET)", 1000, &mget, usize::MAX),
        case("RESP3 map of 3 (HGETALL)", 1000, &hgetall3, usize::MAX),
        case("mixed (1000)", 1000, &mixed, usize::MAX),
    ]
}

// ---------------------------------------------------------------------------------------
// What a session does per read

fn limits() -> RequestLimits {
    let l = LimitsConfig::default();
    RequestLimits {
        max_bulk_len: l.max_bulk_len,
        max_array_len: l.max_array_len,
        max_request_bytes: l.max_request_bytes,
    }
}

fn reply_scanner() -> ReplyScanner {
    let l = LimitsConfig::default();
    ReplyScanner::new(l.max_bulk_len)
}

/// Frames and classifies every request in `buf`, exposing `read` more bytes each time the
/// parser asks for more (as successive socket reads would). Returns the number framed.
fn frame_requests(p: &mut RequestParser, buf: &[u8], read: usize) -> usize {
    let (mut start, mut end, mut n) = (0, read.min(buf.len()), 0);
    loop {
        let tail = &buf[start..end];
        match p.parse(tail).expect("valid request") {
            Some(parsed) => {
                let kind = match &parsed {
                    Parsed::Multibulk { .. } => policy::classify(&p.command(tail)),
                    Parsed::Inline { args, .. } => policy::classify(&Command::Inline { args }),
                    Parsed::Empty { .. } => Kind::Plain,
                };
                black_box(kind);
                start += parsed.len();
                n += 1;
            }
            None if end == buf.len() => break,
            None => end = end.saturating_add(read).min(buf.len()),
        }
    }
    assert_eq!(start, buf.len(), "unframed bytes left");
    n
}

fn frame_replies(s: &mut ReplyScanner, buf: &[u8], read: usize) -> usize {
    let (mut start, mut end, mut n) = (0, read.min(buf.len()), 0);
    loop {
        match s.next(&buf[start..end]).expect("valid reply") {
            Some((len, kind)) => {
                black_box(kind);
                start += len;
                n += 1;
            }
            None if end == buf.len() => break,
            None => end = end.saturating_add(read).min(buf.len()),
        }
    }
    assert_eq!(start, buf.len(), "unframed bytes left");
    n
}

// ---------------------------------------------------------------------------------------
// Allocation counts and a rough timing for the report

struct Measured {
    side: &'static str,
    name: &'static str,
    bytes_per_item: f64,
    first_pass_allocs: usize,
    allocs_per_item: f64,
    ns_per_item: f64,
    zero_alloc: bool,
}

fn measure(side: &'static str, case: &Case, mut pass: impl FnMut() -> usize) -> Measured {
    const PASSES: usize = 5;
    let before = ALLOCS.load(Ordering::Relaxed);
    assert_eq!(pass(), case.count, "{}: wrong frame count", case.name);
    let first_pass_allocs = ALLOCS.load(Ordering::Relaxed) - before;
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..PASSES {
        black_box(pass());
    }
    let steady = ALLOCS.load(Ordering::Relaxed) - before;
    let allocs_per_item = steady as f64 / (PASSES * case.count) as f64;
    // Rough timing: median over passes of ~1 ms worth of work each.
    let reps = (200_000 / case.buf.len().max(1)).clamp(1, 1000);
    let mut samples: Vec<f64> = (0..31)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                black_box(pass());
            }
            t.elapsed().as_nanos() as f64 / (reps * case.count) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    println!(
        "{side} / {}: allocations per command: {allocs_per_item} (first pass: {first_pass_allocs})",
        case.name
    );
    Measured {
        side,
        name: case.name,
        bytes_per_item: case.buf.len() as f64 / case.count as f64,
        first_pass_allocs,
        allocs_per_item,
        ns_per_item: samples[samples.len() / 2],
        zero_alloc: case.zero_alloc,
    }
}

fn report(rows: &[Measured]) -> String {
    let mut out = String::new();
    writeln!(
        out,
        "# Framing hot path: allocations and time per command\n"
    )
    .unwrap();
    writeln!(
        out,
        "Command: `cargo bench --bench framing` ({}; {} cores; {}).\n",
        utc_date().unwrap_or_else(|| "date unknown".into()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model().unwrap_or_else(|| "unknown CPU".into())
    )
    .unwrap();
    writeln!(
        out,
        "Request side: `RequestParser::parse` + `policy::classify` per command; reply side: \
         `ReplyScanner::next` per reply, over one pipelined buffer, with the default \
         `[limits]`. \"Arriving in 16 KiB reads\" exposes the buffer 16 KiB at a time, so \
         frames are resumed across reads as in a session. Allocations are counted by a global \
         allocator wrapper: the first pass warms the parser (its argument vector grows once), \
         then 5 more passes are counted. ns/command is a rough median of our own (31 samples); \
         criterion's statistics are printed by the run and kept in `target/criterion/`.\n"
    )
    .unwrap();
    writeln!(
        out,
        "| side | case | bytes/command | allocations, first pass | allocations/command, steady state | ns/command (rough) |"
    )
    .unwrap();
    writeln!(out, "| --- | --- | ---: | ---: | ---: | ---: |").unwrap();
    for r in rows {
        writeln!(
            out,
            "| {} | {} | {:.0} | {} | {}{} | {:.1} |",
            r.side,
            r.name,
            r.bytes_per_item,
            r.first_pass_allocs,
            r.allocs_per_item,
            if r.zero_alloc { "" } else { " (not asserted)" },
            r.ns_per_item
        )
        .unwrap();
    }
    out
}

// ---------------------------------------------------------------------------------------

fn main() {
    let requests = request_cases();
    let replies = reply_cases();

    let mut rows = Vec::new();
    for case in &requests {
        let mut p = RequestParser::new(limits());
        rows.push(measure("request", case, || {
            frame_requests(&mut p, &case.buf, case.read)
        }));
    }
    for case in &replies {
        let mut s = reply_scanner();
        rows.push(measure("reply", case, || {
            frame_replies(&mut s, &case.buf, case.read)
        }));
    }
    let md = report(&rows);
    std::fs::write(results_dir().join("framing.md"), &md).unwrap();
    println!("wrote results/framing.md");
    let offenders: Vec<String> = rows
        .iter()
        .filter(|r| r.zero_alloc && r.allocs_per_item > 0.0)
        .map(|r| format!("{} / {}: {}", r.side, r.name, r.allocs_per_item))
        .collect();
    assert!(
        offenders.is_empty(),
        "passthrough framing allocates in steady state: {offenders:?}"
    );

    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group("request");
        for case in &requests {
            let mut p = RequestParser::new(limits());
            g.throughput(Throughput::Elements(case.count as u64));
            g.bench_function(case.name, |b| {
                b.iter(|| frame_requests(&mut p, black_box(&case.buf), case.read))
            });
        }
        g.finish();
    }
    {
        let mut g = c.benchmark_group("reply");
        for case in &replies {
            let mut s = reply_scanner();
            g.throughput(Throughput::Elements(case.count as u64));
            g.bench_function(case.name, |b| {
                b.iter(|| frame_replies(&mut s, black_box(&case.buf), case.read))
            });
        }
        g.finish();
    }
    c.final_summary();
}
