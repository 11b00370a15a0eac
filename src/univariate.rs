//! `meshwatch score`: the detector's rate or latency model over one univariate series, so
//! the models can be run on public anomaly benchmarks.
//!
//! Causal: each row is scored against what the rows before it taught, then learnt from.
//! Input rows are `timestamp,value`; a header line, blank lines and comment lines (`#`) are
//! passed over. The timestamp is kept as written; when it reads as a Unix time (seconds or
//! milliseconds) or as `YYYY-MM-DD[ T]HH:MM[:SS]`, it also drives the daily and weekly shapes
//! of the rate model.

use std::io::{BufRead, Write};

use meshwatch_detector::baseline::{CountBaseline, LatencyBaseline};

/// Which model scores the series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// Counts per interval: seasonal Poisson with overdispersion, both tails.
    Rate,
    /// Durations: log-space level and spread, upper tail.
    Latency,
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("line {line}: `{text}` is not `timestamp,value`")]
    Row { line: usize, text: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Rows before the first score above zero.
const WARMUP_ROWS: u64 = 30;

/// Milliseconds of a timestamp, when it reads as one.
fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim().trim_matches('"');
    if let Ok(n) = s.parse::<f64>() {
        // Seconds until the year 5138, milliseconds after.
        return Some(if n.abs() < 1e11 { (n * 1000.0) as i64 } else { n as i64 });
    }
    let (date, time) = s.split_once([' ', 'T']).unwrap_or((s, "00:00:00"));
    let d: Vec<i64> = date.split('-').map(str::parse).collect::<Result<_, _>>().ok()?;
    let t: Vec<i64> = time
        .trim_end_matches('Z')
        .split(':')
        .map(|p| p.parse::<f64>().map(|v| v as i64))
        .collect::<Result<_, _>>()
        .ok()?;
    let [y, m, day] = d[..] else { return None };
    let (hh, mm, ss) = (*t.first()?, *t.get(1).unwrap_or(&0), *t.get(2).unwrap_or(&0));
    // Days from civil (Howard Hinnant).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000)
}

/// Scores every row of `input` into `output` as `timestamp,value,anomaly_score`.
pub fn score(input: impl BufRead, mut output: impl Write, model: Model) -> Result<u64, ScoreError> {
    let mut rate = CountBaseline::default();
    let mut latency = LatencyBaseline::default();
    let mut rows = 0u64;
    writeln!(output, "timestamp,value,anomaly_score")?;
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let Some((ts, value_text)) = text.rsplit_once(',') else {
            return Err(ScoreError::Row { line: i + 1, text: line });
        };
        let Ok(value) = value_text.trim().parse::<f64>() else {
            if rows == 0 {
                continue; // a header
            }
            return Err(ScoreError::Row { line: i + 1, text: line });
        };
        let t_ms = parse_time(ts).unwrap_or(rows as i64 * 60_000);
        let p_value = match model {
            Model::Rate => {
                let value = if value.is_finite() { value.max(0.0) } else { 0.0 };
                let p = rate.assess(value, rate.expected(t_ms), 1e-6).p_value;
                rate.update(value, t_ms, false, u32::MAX);
                p
            }
            Model::Latency => {
                let log_value = if value.is_finite() && value > 0.0 { value.ln() } else { f64::MIN_POSITIVE.ln() };
                let a = latency.assess(0.5, log_value, 1.0, 1.0, 1e-6);
                latency.update(0.5, log_value, 1.0, None, false, 1, u32::MAX);
                if a.high { a.p_value } else { 1.0 }
            }
        };
        let score = if rows < WARMUP_ROWS { 0.0 } else { (1.0 - p_value).clamp(0.0, 1.0) };
        writeln!(output, "{},{},{score:.6}", ts.trim(), value_text.trim())?;
        rows += 1;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(csv: &str, model: Model) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        score(csv.as_bytes(), &mut out, model).expect("scores");
        String::from_utf8(out)
            .expect("utf-8")
            .lines()
            .skip(1)
            .map(|l| {
                let mut parts = l.rsplitn(2, ',');
                let s = parts.next().expect("score").parse().expect("number");
                (parts.next().expect("rest").to_string(), s)
            })
            .collect()
    }

    #[test]
    fn a_spike_scores_high_and_the_rest_low() {
        let mut csv = String::from("timestamp,value\n");
        for i in 0..200 {
            let v = if i == 150 { 400 } else { 100 + (i * 37 % 11) };
            csv.push_str(&format!("{},{v}\n", 1_700_000_000 + i * 60));
        }
        let scores = run(&csv, Model::Rate);
        assert_eq!(scores.len(), 200);
        assert!(scores[150].1 > 0.999_999, "{:?}", scores[150]);
        assert!(scores.iter().enumerate().filter(|(i, _)| *i != 150).all(|(_, (_, s))| *s < 0.999), "{scores:?}");
        assert!(scores.iter().all(|(_, s)| (0.0..=1.0).contains(s)));
        assert!(scores[..30].iter().all(|(_, s)| *s == 0.0), "warm-up rows score 0");
        assert_eq!(scores[0].0, "1700000000,100");
    }

    #[test]
    fn latency_model_flags_slow_rows_only() {
        let mut csv = String::new();
        for i in 0..100 {
            let v = if i == 80 {
                900.0
            } else if i == 90 {
                1.0
            } else {
                40.0 + (i % 5) as f64
            };
            csv.push_str(&format!("2024-01-01 00:{:02}:00,{v}\n", i % 60));
        }
        let scores = run(&csv, Model::Latency);
        assert!(scores[80].1 > 0.999, "{:?}", scores[80]);
        assert!(scores[90].1 < 0.5, "faster is not an anomaly: {:?}", scores[90]);
    }

    #[test]
    fn bad_rows_are_clear_errors() {
        let err = score("t,v\n1,2\n3,x\n".as_bytes(), Vec::new(), Model::Rate).expect_err("bad value");
        assert!(err.to_string().starts_with("line 3:"), "{err}");
        assert!(score("1,2\nnonsense\n".as_bytes(), Vec::new(), Model::Rate).is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_time("1700000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time("1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time("1970-01-02 01:00:00"), Some(90_000_000));
        assert_eq!(parse_time("1970-01-02T01:00Z"), Some(90_000_000));
        assert_eq!(parse_time("yesterday"), None);
    }
}
