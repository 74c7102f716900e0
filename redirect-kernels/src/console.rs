//! What a run tells: the console markers the init prints, libtest's result lines, and one
//! verdict per expected test (pure, unit-tested).

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

/// The verdict of one test on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

impl Outcome {
    pub fn cell(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skip(_) => "skip",
        }
    }
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Pass => None,
            Outcome::Fail(r) | Outcome::Skip(r) => Some(r),
        }
    }
}

/// How a guest (or the host run) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The init printed its end marker.
    Completed,
    /// The kernel panicked (the line is kept).
    Panicked(String),
    /// Killed after the timeout.
    TimedOut(Duration),
    /// qemu exited without the end marker.
    Exited(String),
}

impl RunEnd {
    pub fn ok(&self) -> bool {
        matches!(self, RunEnd::Completed)
    }
    pub fn describe(&self) -> String {
        match self {
            RunEnd::Completed => "completed".into(),
            RunEnd::Panicked(l) => format!("kernel panic: {l}"),
            RunEnd::TimedOut(d) => format!("hung: killed after the {}s timeout", d.as_secs()),
            RunEnd::Exited(s) => format!("guest exited early ({s})"),
        }
    }
}

/// Console markers printed by the init (and by the host run).
pub const M_BOOTED: &str = "==> BOOTED";
const M_MODULE_FAIL: &str = "==> MODULE-FAILED ";
pub const M_PROBE_BEGIN: &str = "==> PROBE-BEGIN";
pub const M_PROBE_END: &str = "==> PROBE-END";
pub const M_TEST_BEGIN: &str = "==> TEST-BEGIN ";
pub const M_TEST_END: &str = "==> TEST-END ";
pub const M_DONE: &str = "==> DONE";

/// What one run (a guest's console, or the host's output) tells.
#[derive(Debug, Default)]
pub struct Parsed {
    /// binary -> test -> outcome.
    pub results: BTreeMap<String, BTreeMap<String, Outcome>>,
    /// binaries whose section ended, with the exit status.
    pub ended: BTreeMap<String, i32>,
    pub probe_json: Option<String>,
    pub module_failures: Vec<String>,
    pub done: bool,
    pub booted: bool,
}

/// Strips the carriage returns and ANSI escapes a serial console adds.
pub fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                // CSI ... final byte
                // CSI sequences up to their final letter; other escapes are one character.
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Parses a console transcript: marker lines, and libtest's `test NAME ... ok|FAILED|ignored`.
pub fn parse_console(text: &str) -> Parsed {
    let mut p = Parsed::default();
    let mut current: Option<String> = None;
    // Failure output blocks: `---- NAME stdout ----` up to the next blank-line-separated marker.
    let mut fail_block: Option<(String, Vec<String>)> = None;
    let mut fail_msgs: HashMap<(String, String), String> = HashMap::new();
    let mut probe: Option<String> = None;
    let mut pending: Option<String> = None;
    for raw in text.lines() {
        let line = clean(raw);
        if let Some(buf) = probe.as_mut() {
            if line.starts_with(M_PROBE_END) {
                p.probe_json = probe.take();
            } else {
                buf.push_str(&line);
                buf.push('\n');
            }
            continue;
        }
        if line.starts_with(M_BOOTED) {
            p.booted = true;
        } else if let Some(m) = line.strip_prefix(M_MODULE_FAIL) {
            p.module_failures.push(m.trim().to_string());
        } else if line.starts_with(M_PROBE_BEGIN) {
            probe = Some(String::new());
        } else if let Some(bin) = line.strip_prefix(M_TEST_BEGIN) {
            let bin = bin.trim().to_string();
            p.results.entry(bin.clone()).or_default();
            current = Some(bin);
        } else if let Some(rest) = line.strip_prefix(M_TEST_END) {
            let mut it = rest.split_whitespace();
            if let (Some(bin), Some(code)) = (it.next(), it.next()) {
                p.ended.insert(bin.to_string(), code.parse().unwrap_or(-1));
            }
            if let Some((name, lines)) = fail_block.take() {
                if let Some(bin) = &current {
                    fail_msgs.insert((bin.clone(), name), failure_reason(&lines));
                }
            }
            current = None;
        } else if line.starts_with(M_DONE) {
            p.done = true;
        } else if let Some(bin) = current.clone() {
            if let Some(rest) = line.strip_prefix("---- ") {
                if let Some(name) = rest.strip_suffix(" stdout ----") {
                    if let Some((prev, lines)) = fail_block.take() {
                        fail_msgs.insert((bin.clone(), prev), failure_reason(&lines));
                    }
                    fail_block = Some((name.to_string(), Vec::new()));
                    continue;
                }
            }
            if let Some((name, outcome)) = parse_test_line(&line) {
                p.results.entry(bin).or_default().insert(name, outcome);
                pending = None;
                continue;
            }
            // A test's child wrote onto the harness's line: the verdict follows on its own line.
            if let Some(name) = line
                .strip_prefix("test ")
                .and_then(|r| r.split_once(" ... "))
                .map(|(n, _)| n.trim().to_string())
            {
                pending = Some(name);
                continue;
            }
            if let Some(name) = pending.take() {
                match parse_verdict(line.trim()) {
                    Some(outcome) => {
                        p.results.entry(bin).or_default().insert(name, outcome);
                        continue;
                    }
                    None => pending = Some(name),
                }
            }
            if line.starts_with("failures:") || line.starts_with("test result:") {
                if let Some((prev, lines)) = fail_block.take() {
                    fail_msgs.insert((bin.clone(), prev), failure_reason(&lines));
                }
                continue;
            }
            if let Some((_, lines)) = fail_block.as_mut() {
                lines.push(line);
            }
        }
    }
    if let Some((name, lines)) = fail_block.take() {
        if let Some(bin) = &current {
            fail_msgs.insert((bin.clone(), name), failure_reason(&lines));
        }
    }
    for ((bin, name), msg) in fail_msgs {
        if let Some(Outcome::Fail(r)) = p.results.get_mut(&bin).and_then(|m| m.get_mut(&name)) {
            if r.is_empty() {
                *r = msg;
            }
        }
    }
    p
}

/// `test NAME ... ok` and friends. With one test thread a line whose test is still running
/// reads `test NAME ... ` and is not a result.
fn parse_test_line(line: &str) -> Option<(String, Outcome)> {
    let rest = line.strip_prefix("test ")?;
    let (name, verdict) = rest.split_once(" ... ")?;
    Some((name.trim().to_string(), parse_verdict(verdict.trim())?))
}

fn parse_verdict(verdict: &str) -> Option<Outcome> {
    let outcome = if verdict == "ok" {
        Outcome::Pass
    } else if verdict == "FAILED" {
        Outcome::Fail(String::new())
    } else if let Some(r) = verdict.strip_prefix("ignored") {
        let r = r.trim_start_matches(',').trim();
        Outcome::Skip(if r.is_empty() {
            "ignored".into()
        } else {
            r.into()
        })
    } else {
        return None;
    };
    Some(outcome)
}

/// The panic message of a failed test: the lines after `panicked at FILE:LINE:`.
fn failure_reason(lines: &[String]) -> String {
    let mut msg = Vec::new();
    let mut after_panic = false;
    for l in lines {
        if l.contains("panicked at") {
            after_panic = true;
            continue;
        }
        if after_panic {
            if l.trim().is_empty() || l.starts_with("note: ") || l.starts_with("stack backtrace") {
                break;
            }
            msg.push(l.trim());
        }
    }
    if msg.is_empty() {
        msg = lines
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .take(2)
            .collect();
    }
    let joined = msg.join(" ");
    truncate(&joined, 300)
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Every expected test gets a cell: what the run reported, or a failure that says why not.
pub fn cells(
    expected: &[(String, Vec<String>)],
    parsed: &Parsed,
    end: &RunEnd,
) -> BTreeMap<(String, String), Outcome> {
    let mut out = BTreeMap::new();
    for (bin, tests) in expected {
        let got = parsed.results.get(bin);
        let ended = parsed.ended.get(bin);
        for t in tests {
            let outcome = match got.and_then(|g| g.get(t)) {
                Some(o) => o.clone(),
                None => {
                    let why = if got.is_none() {
                        if end.ok() {
                            "not run".to_string()
                        } else {
                            format!("not run: {}", end.describe())
                        }
                    } else if ended.is_none() {
                        format!("no result: {}", end.describe())
                    } else {
                        format!(
                            "no result (test binary exited {})",
                            ended.copied().unwrap_or(-1)
                        )
                    };
                    Outcome::Fail(why)
                }
            };
            out.insert((bin.clone(), t.clone()), outcome);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "\
[    0.000000] Linux version 5.10.0\r
==> BOOTED 5.10 5.10.0-32-cloud-amd64 1.52\r
==> MODULE-FAILED xt_owner insmod: can't insert\r
==> PROBE-BEGIN\r
{\"kernel\": \"5.10\", \"ok\": true, \"features\": []}\r
==> PROBE-END 0\r
==> TEST-BEGIN redirect-agent:probe\r
\r
running 3 tests\r
test map_hash ... ok\r
test helper_x ... FAILED\r
test slow_one ... ignored, needs a second node\r
\r
failures:\r
\r
---- helper_x stdout ----\r
\r
thread 'helper_x' panicked at redirect-agent/tests/probe.rs:14:5:\r
helper_x is missing on kernel 5.10\r
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\r
\r
failures:\r
    helper_x\r
\r
test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\r
==> TEST-END redirect-agent:probe 101\r
==> TEST-BEGIN redirect-agent:datapath\r
running 2 tests\r
test enroll_connect ... enrolled web (slot 0)\r
ok\r
test inbound ... ";

    fn expected() -> Vec<(String, Vec<String>)> {
        vec![
            (
                "redirect-agent:probe".into(),
                vec!["map_hash".into(), "helper_x".into(), "slow_one".into()],
            ),
            (
                "redirect-agent:datapath".into(),
                vec!["enroll_connect".into(), "inbound".into()],
            ),
            ("redirect-testbed:testbed".into(), vec!["smoke".into()]),
        ]
    }

    #[test]
    fn parses_results_reasons_and_markers() {
        let p = parse_console(CONSOLE);
        assert!(p.booted);
        assert!(!p.done);
        assert_eq!(p.module_failures, vec!["xt_owner insmod: can't insert"]);
        assert!(p.probe_json.as_deref().unwrap().contains("\"ok\": true"));
        let probe = &p.results["redirect-agent:probe"];
        assert_eq!(probe["map_hash"], Outcome::Pass);
        assert_eq!(
            probe["helper_x"],
            Outcome::Fail("helper_x is missing on kernel 5.10".into())
        );
        assert_eq!(
            probe["slow_one"],
            Outcome::Skip("needs a second node".into())
        );
        assert_eq!(p.ended["redirect-agent:probe"], 101);
        // A test still running when the console stops is not a result.
        assert!(!p.results["redirect-agent:datapath"].contains_key("inbound"));
        // A verdict pushed to the next line by a child's output still counts.
        assert_eq!(
            p.results["redirect-agent:datapath"]["enroll_connect"],
            Outcome::Pass
        );
    }

    #[test]
    fn a_dead_guest_fails_the_tests_it_did_not_finish() {
        let p = parse_console(CONSOLE);
        for end in [
            RunEnd::TimedOut(Duration::from_secs(7)),
            RunEnd::Panicked("Kernel panic - not syncing: Fatal exception".into()),
        ] {
            let c = cells(&expected(), &p, &end);
            let key = |b: &str, t: &str| (b.to_string(), t.to_string());
            assert_eq!(
                c[&key("redirect-agent:datapath", "enroll_connect")],
                Outcome::Pass
            );
            let Outcome::Fail(r) = &c[&key("redirect-agent:datapath", "inbound")] else {
                panic!("inbound should fail");
            };
            assert!(r.contains(&end.describe()), "{r}");
            let Outcome::Fail(r) = &c[&key("redirect-testbed:testbed", "smoke")] else {
                panic!("smoke should fail");
            };
            assert!(r.starts_with("not run"), "{r}");
        }
    }

    #[test]
    fn clean_console_lines() {
        assert_eq!(clean("\u{1b}[0mtest a ... ok\r"), "test a ... ok");
        assert_eq!(
            clean("\u{1b}c\u{1b}[?7l\u{1b}[2J==> BOOTED x"),
            "==> BOOTED x"
        );
        assert_eq!(
            parse_test_line("test a::b ... ok"),
            Some(("a::b".into(), Outcome::Pass))
        );
        assert_eq!(parse_test_line("test a ... "), None);
        assert_eq!(parse_test_line("test result: ok. 1 passed"), None);
    }
}
