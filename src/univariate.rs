//! `meshwatch score`: the detector's per-pair baselines over one univariate series, so that
//! they can be run on real labelled series (`meshwatch backtest`) and public benchmarks.
//!
//! Causal: each row is scored against what the rows before it taught, then learnt from.
//! Input rows are `timestamp,value`; a header line, blank lines and comment lines (`#`) are
//! passed over. The timestamp is kept as written; when it reads as a Unix time (seconds or
//! milliseconds) or as `YYYY-MM-DD[ T]HH:MM[:SS]`, it also drives the daily and weekly shapes.
//! The series' interval (the median step between rows) is the baselines' window length, so
//! their memories (a day, a week, a quarter of an hour) are the same in time at any resolution.
//!
//! The score of a row is `−log10 p`, p being the tail probability of a deviation at least as
//! large under the learnt baseline (so 6 is p = 1e-6, the detector's threshold), capped at
//! 300: it keeps its order far into the tail, where `1 − p` would be 1.000000 for all.
use std::io::{BufRead, Write};

use meshwatch_detector::baseline::{Cadence, CountBaseline, LatencyBaseline, LearntSpread};

/// Which baseline scores the series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// Picked from the values: `rate` for non-negative values (counts when they are all
    /// whole numbers).
    Auto,
    /// Counts or non-negative amounts per interval: the request-rate baseline (level, daily
    /// and weekly shape, short-term factor) with its spread learnt from the series; both tails.
    Rate,
    /// A share (errors over requests, crashes over launches) without its counts: the rate
    /// baseline on the share, upper tail only (only an increase is an anomaly).
    Ratio,
    /// Durations: the latency baseline (log-space level and learnt spread), upper tail.
    Latency,
}

impl Model {
    pub fn parse(s: &str) -> Option<Model> {
        Some(match s {
            "auto" => Model::Auto,
            "rate" => Model::Rate,
            "ratio" => Model::Ratio,
            "latency" => Model::Latency,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Model::Auto => "auto",
            Model::Rate => "rate",
            Model::Ratio => "ratio",
            Model::Latency => "latency",
        }
    }

    /// The model that scores: `Auto` is `Rate`.
    pub fn resolve(self) -> Model {
        match self {
            Model::Auto => Model::Rate,
            m => m,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("line {line}: `{text}` is not `timestamp,value`")]
    Row { line: usize, text: String },
    #[error("line {line}: {value} is negative; the rate, ratio and latency models take values of 0 or more")]
    Negative { line: usize, value: f64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One row of a series.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The timestamp as written.
    pub ts: String,
    pub t_ms: i64,
    pub value: f64,
}

/// The score at which the detector's threshold (p = 1e-6) is reached.
pub const PAGE_SCORE: f64 = 6.0;
const MAX_SCORE: f64 = 300.0;
const THRESHOLD_P: f64 = 1e-6;

/// A row of a latency series is an aggregate, not one request: its spread is all between
/// rows (learnt), none of it the sampling error of a few requests.
const ROW_REQUESTS: f64 = 1e9;

/// Rows scored 0 at first, whatever the interval: a baseline needs a few to start from.
const MIN_WARMUP_ROWS: u64 = 30;

/// Milliseconds of a timestamp, when it reads as one.
pub fn parse_time(s: &str) -> Option<i64> {
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

/// Reads `timestamp,value` rows. A timestamp that is not a time is row number × 1 min.
pub fn read_rows(input: impl BufRead) -> Result<Vec<Row>, ScoreError> {
    let mut rows = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let Some((ts, value_text)) = text.rsplit_once(',') else {
            return Err(ScoreError::Row { line: i + 1, text: line });
        };
        let value = match value_text.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => v,
            _ if rows.is_empty() => continue, // a header
            _ => return Err(ScoreError::Row { line: i + 1, text: line }),
        };
        if value < 0.0 {
            return Err(ScoreError::Negative { line: i + 1, value });
        }
        let t_ms = parse_time(ts).unwrap_or(rows.len() as i64 * 60_000);
        rows.push(Row { ts: ts.trim().to_string(), t_ms, value });
    }
    Ok(rows)
}

/// The series' interval: the median step between rows (1 min when there is none).
pub fn interval_ms(rows: &[Row]) -> i64 {
    let mut steps: Vec<i64> = rows.windows(2).map(|w| w[1].t_ms - w[0].t_ms).filter(|&d| d > 0).collect();
    if steps.is_empty() {
        return 60_000;
    }
    let mid = steps.len() / 2;
    *steps.select_nth_unstable(mid).1
}

/// `−log10 p`, capped.
fn score_of(p_value: f64) -> f64 {
    if p_value > 0.0 { (-p_value.log10()).clamp(0.0, MAX_SCORE) } else { MAX_SCORE }
}

/// Scores each row, causally.
pub fn score_rows(rows: &[Row], model: Model, interval_ms: i64) -> Vec<f64> {
    let cadence = Cadence::of(interval_ms);
    let warmup = cadence.day().max(MIN_WARMUP_ROWS);
    // A lasting shift is taken as the new normal after a day, as the live detector does
    // after its `adapt_after`; at least 12 rows.
    let adapt_after = u32::try_from(cadence.day().max(12)).unwrap_or(u32::MAX);
    let counts = rows.iter().all(|r| r.value.fract() == 0.0);
    let model = model.resolve();
    let spread = LearntSpread::new(counts && model == Model::Rate);
    let mut rate = CountBaseline { spread, ..CountBaseline::default() };
    let mut latency = LatencyBaseline::default();
    let mut scores = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let (t_ms, value) = (row.t_ms, row.value);
        let p_value = match model {
            Model::Auto | Model::Rate | Model::Ratio => {
                let a = rate.assess(value, rate.expected(t_ms, cadence), THRESHOLD_P);
                let p = if model == Model::Ratio && !a.high { 1.0 } else { a.p_value };
                let hot = i as u64 >= warmup && p < THRESHOLD_P;
                rate.update(value, t_ms, hot, adapt_after, cadence);
                p
            }
            Model::Latency if value > 0.0 => {
                let log_value = value.ln();
                let a = latency.assess(0.5, log_value, ROW_REQUESTS, 1.0, THRESHOLD_P);
                let p = if a.high { a.p_value } else { 1.0 };
                let hot = i as u64 >= warmup && p < THRESHOLD_P;
                latency.update(0.5, log_value, ROW_REQUESTS, None, hot, 1, adapt_after, cadence);
                p
            }
            // No duration to learn from (a gap written as 0).
            Model::Latency => 1.0,
        };
        scores.push(if (i as u64) < warmup { 0.0 } else { score_of(p_value) });
    }
    scores
}

/// Scores every row of `input` into `output` as `timestamp,value,anomaly_score`; returns the
/// rows and the model that scored them.
pub fn score(input: impl BufRead, mut output: impl Write, model: Model) -> Result<(u64, Model), ScoreError> {
    let rows = read_rows(input)?;
    let model = model.resolve();
    let scores = score_rows(&rows, model, interval_ms(&rows));
    writeln!(output, "timestamp,value,anomaly_score")?;
    for (row, s) in rows.iter().zip(&scores) {
        writeln!(output, "{},{},{s:.3}", row.ts, row.value)?;
    }
    Ok((rows.len() as u64, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600;

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

    /// Hourly rows (Unix seconds) of `value(i)`.
    fn hourly(n: i64, value: impl Fn(i64) -> f64) -> String {
        let mut csv = String::from("timestamp,value\n");
        for i in 0..n {
            csv.push_str(&format!("{},{}\n", 1_700_000_000 + i * H, value(i)));
        }
        csv
    }

    #[test]
    fn a_spike_pages_and_the_rest_does_not() {
        let scores = run(&hourly(200, |i| if i == 150 { 400.0 } else { (100 + (i * 37 % 11)) as f64 }), Model::Auto);
        assert_eq!(scores.len(), 200);
        assert!(scores[150].1 >= PAGE_SCORE, "{:?}", scores[150]);
        let others: Vec<_> = scores.iter().enumerate().filter(|(i, (_, s))| *i != 150 && *s >= PAGE_SCORE).collect();
        assert!(others.is_empty(), "{others:?}");
        assert!(scores.iter().all(|(_, s)| s.is_finite() && (0.0..=MAX_SCORE).contains(s)));
        assert!(scores[..30].iter().all(|(_, s)| *s == 0.0), "warm-up rows score 0");
        assert_eq!(scores[0].0, "1700000000,100");
    }

    #[test]
    fn scores_keep_their_order_far_in_the_tail() {
        // Where 1 − p would read 1.000000 for all three, −log10 p keeps them apart.
        let spike = |size: f64| {
            let scores = run(&hourly(100, |i| if i == 80 { size } else { (100 + (i * 37 % 11)) as f64 }), Model::Rate);
            scores[80].1
        };
        let (triple, tenfold, hundredfold) = (spike(300.0), spike(1_000.0), spike(10_000.0));
        assert!(PAGE_SCORE <= triple && triple < tenfold && tenfold < hundredfold, "{triple} {tenfold} {hundredfold}");
    }

    #[test]
    fn continuous_values_far_from_counts_are_scored_on_their_own_scale() {
        // Tiny shares (0.2 %) and huge amounts (2 million) with 5 % noise: a doubling pages,
        // the noise does not.
        for scale in [0.002, 2e6] {
            let noise = |i: i64| 1.0 + 0.05 * (((i * 7_919) % 21) as f64 / 10.0 - 1.0);
            let scores = run(&hourly(300, |i| scale * noise(i) * if i == 250 { 2.0 } else { 1.0 }), Model::Auto);
            let paged: Vec<usize> =
                scores.iter().enumerate().filter(|(_, (_, s))| *s >= PAGE_SCORE).map(|(i, _)| i).collect();
            assert_eq!(paged, vec![250], "scale {scale}");
        }
    }

    #[test]
    fn the_interval_is_inferred_and_sets_the_warm_up() {
        let rows = read_rows(hourly(50, |_| 1.0).as_bytes()).expect("rows");
        assert_eq!(interval_ms(&rows), 3_600_000);
        // A day of minutes is 1,440 rows of warm-up; a day of hours is 24, raised to 30.
        let minutes: String = (0..2_000).map(|i| format!("{},5\n", 1_700_000_000 + i * 60)).collect();
        let rows = read_rows(minutes.as_bytes()).expect("rows");
        assert_eq!(interval_ms(&rows), 60_000);
        let scores = score_rows(&rows, Model::Rate, 60_000);
        assert!(scores[..1_440].iter().all(|s| *s == 0.0));
        // A constant series never pages.
        assert!(scores.iter().all(|s| *s < 1.0), "{:?}", scores.iter().copied().fold(0.0, f64::max));
    }

    #[test]
    fn ratio_and_latency_models_flag_increases_only() {
        let slow = |i: i64| {
            if i == 80 {
                900.0
            } else if i == 90 {
                1.0
            } else {
                40.0 + (i % 5) as f64
            }
        };
        for model in [Model::Latency, Model::Ratio] {
            let scores = run(&hourly(100, slow), model);
            assert!(scores[80].1 >= PAGE_SCORE, "{model:?} {:?}", scores[80]);
            assert!(scores[90].1 < 0.5, "{model:?}: lower is not an anomaly: {:?}", scores[90]);
        }
    }

    #[test]
    fn bad_rows_are_clear_errors() {
        let err = score("t,v\n1,2\n3,x\n".as_bytes(), Vec::new(), Model::Rate).expect_err("bad value");
        assert!(err.to_string().starts_with("line 3:"), "{err}");
        assert!(score("1,2\nnonsense\n".as_bytes(), Vec::new(), Model::Rate).is_err());
        let err = score("1,2\n2,-1\n".as_bytes(), Vec::new(), Model::Auto).expect_err("negative");
        assert!(err.to_string().starts_with("line 2: -1 is negative"), "{err}");
        assert_eq!(Model::parse("sideways"), None);
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
