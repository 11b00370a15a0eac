//! `meshwatch backtest`: runs `meshwatch score` over every series of a folder of labelled
//! series and measures it by labelled windows, beside two baselines computed on the same
//! series: a rolling-window Gaussian z-score and "never alarm".
//!
//! Scoring is by events (pure, in `judge`): an *alarm event* is a run of consecutive alarmed
//! rows. A labelled window is *hit* when an event overlaps it (both ends inclusive); an event
//! that overlaps no window is a *false alarm event*. Then, per series and summed per folder:
//! true positives = windows hit, false positives = false alarm events, false negatives =
//! windows missed; event precision TP/(TP+FP), recall TP/(TP+FN), F1 = 2TP/(2TP+FP+FN); false
//! alarm events per 1,000 rows; and for each window hit, the time of its first alarm as a
//! fraction of the window's length (0 = at its start; a one-row window is 0).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::univariate::{self, Model, Row, ScoreError};

/// The detectors a backtest compares.
pub const DETECTORS: [&str; 3] = ["meshwatch", "rolling_gaussian", "never"];

/// The rolling Gaussian: mean and standard deviation of the last day of rows (at least 24),
/// alarm when the row is `GAUSSIAN_Z` or more of them away, either way.
pub const GAUSSIAN_Z: f64 = 4.0;
const GAUSSIAN_MIN_ROWS: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Series { path: PathBuf, source: ScoreError },
    #[error("{path}: not a windows file (`{{\"folder/name.csv\": [[start, end], …]}}`): {source}")]
    Windows { path: PathBuf, source: serde_json::Error },
    #[error("{path}: window `{text}` is not a time")]
    WindowTime { path: PathBuf, text: String },
    #[error("{0}: no series (.csv) under it")]
    Empty(PathBuf),
}

/// What one detector did on one series, or summed over several.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Outcome {
    pub rows: u64,
    pub windows: u64,
    pub windows_hit: u64,
    pub false_events: u64,
    /// First alarm inside each window hit, as a fraction of the window.
    pub first_alarm_fractions: Vec<f64>,
}

impl Outcome {
    fn add(&mut self, other: &Outcome) {
        self.rows += other.rows;
        self.windows += other.windows;
        self.windows_hit += other.windows_hit;
        self.false_events += other.false_events;
        self.first_alarm_fractions.extend(&other.first_alarm_fractions);
    }

    /// TP / (TP + FP); 1 when nothing alarmed (no false alarm was raised).
    pub fn precision(&self) -> f64 {
        let raised = self.windows_hit + self.false_events;
        if raised == 0 { 1.0 } else { self.windows_hit as f64 / raised as f64 }
    }

    /// TP / (TP + FN); 1 when there was nothing to find.
    pub fn recall(&self) -> f64 {
        if self.windows == 0 { 1.0 } else { self.windows_hit as f64 / self.windows as f64 }
    }

    /// 2TP / (2TP + FP + FN): 0 when windows were all missed or nothing was labelled and
    /// something alarmed, 1 when every window was hit without a false event.
    pub fn f1(&self) -> f64 {
        let missed = self.windows - self.windows_hit;
        let denominator = 2 * self.windows_hit + self.false_events + missed;
        if denominator == 0 { 1.0 } else { 2.0 * self.windows_hit as f64 / denominator as f64 }
    }

    pub fn false_events_per_1000_rows(&self) -> f64 {
        if self.rows == 0 { 0.0 } else { self.false_events as f64 * 1000.0 / self.rows as f64 }
    }

    /// Median of the first-alarm fractions (interpolated), when a window was hit.
    pub fn median_first_alarm(&self) -> Option<f64> {
        let mut v = self.first_alarm_fractions.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = (v.len() - 1) as f64 / 2.0;
        Some((v[mid.floor() as usize] + v[mid.ceil() as usize]) / 2.0)
    }
}

/// Judges alarms (one flag per row, rows in time order) against labelled windows
/// (`[start, end]` in ms, both inclusive).
pub fn judge(times_ms: &[i64], alarms: &[bool], windows: &[(i64, i64)]) -> Outcome {
    let mut out = Outcome { rows: times_ms.len() as u64, windows: windows.len() as u64, ..Outcome::default() };
    let mut first_alarm: Vec<Option<i64>> = vec![None; windows.len()];
    let mut i = 0;
    while i < alarms.len() {
        if !alarms[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < alarms.len() && alarms[i] {
            i += 1;
        }
        let (from, to) = (times_ms[start], times_ms[i - 1]);
        let mut in_window = false;
        for (w, &(ws, we)) in windows.iter().enumerate() {
            if from <= we && to >= ws {
                in_window = true;
                // The first alarmed row of this event inside the window.
                let t = times_ms[start..i].iter().copied().find(|&t| t >= ws).unwrap_or(ws);
                first_alarm[w] = Some(first_alarm[w].map_or(t, |f: i64| f.min(t)));
            }
        }
        if !in_window {
            out.false_events += 1;
        }
    }
    for (&(ws, we), first) in windows.iter().zip(&first_alarm) {
        if let Some(t) = first {
            out.windows_hit += 1;
            out.first_alarm_fractions.push(if we > ws { (t - ws) as f64 / (we - ws) as f64 } else { 0.0 });
        }
    }
    out
}

/// The rolling Gaussian's alarms: causal, the row against the day of rows before it.
pub fn rolling_gaussian(rows: &[Row], interval_ms: i64) -> Vec<bool> {
    let n = ((86_400_000 / interval_ms.max(1)) as usize).max(GAUSSIAN_MIN_ROWS);
    let mut alarms = Vec::with_capacity(rows.len());
    let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
    for (i, row) in rows.iter().enumerate() {
        let count = i.min(n);
        let alarm = if count >= GAUSSIAN_MIN_ROWS {
            let mean = sum / count as f64;
            let var = (sum_sq / count as f64 - mean * mean).max(0.0);
            let sd = var.sqrt();
            if sd > 0.0 { ((row.value - mean) / sd).abs() >= GAUSSIAN_Z } else { row.value != mean }
        } else {
            false
        };
        alarms.push(alarm);
        sum += row.value;
        sum_sq += row.value * row.value;
        if i >= n {
            let old = rows[i - n].value;
            sum -= old;
            sum_sq -= old * old;
        }
    }
    alarms
}

/// One series' outcome for each detector (in the order of `DETECTORS`).
#[derive(Clone, Debug, Serialize)]
pub struct SeriesReport {
    pub series: String,
    pub model: &'static str,
    pub interval_s: f64,
    pub detectors: BTreeMap<&'static str, Outcome>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub threshold_score: f64,
    pub series: Vec<SeriesReport>,
    /// Summed per folder (the series' parent directory), then over all.
    pub folders: BTreeMap<String, BTreeMap<&'static str, Outcome>>,
    pub total: BTreeMap<&'static str, Outcome>,
}

/// The labelled windows of a windows file, by series name relative to the series folder.
pub fn read_windows(path: &Path) -> Result<BTreeMap<String, Vec<(i64, i64)>>, BacktestError> {
    let text = std::fs::read_to_string(path).map_err(|source| BacktestError::Io { path: path.into(), source })?;
    let raw: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(&text).map_err(|source| BacktestError::Windows { path: path.into(), source })?;
    let time = |s: &str| {
        univariate::parse_time(s).ok_or_else(|| BacktestError::WindowTime { path: path.into(), text: s.to_string() })
    };
    raw.into_iter()
        .map(|(name, ws)| {
            let ws = ws.iter().map(|(a, b)| Ok((time(a)?, time(b)?))).collect::<Result<Vec<_>, BacktestError>>()?;
            Ok((name, ws))
        })
        .collect()
}

fn csv_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), BacktestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| BacktestError::Io { path: dir.into(), source })?;
    for entry in entries {
        let path = entry.map_err(|source| BacktestError::Io { path: dir.into(), source })?.path();
        if path.is_dir() {
            csv_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "csv") {
            out.push(path);
        }
    }
    Ok(())
}

/// Backtests every `.csv` under `dir` (a series without windows in the file has none: every
/// alarm on it is false). `progress` is told each series as it is done.
pub fn run(
    dir: &Path,
    windows: &BTreeMap<String, Vec<(i64, i64)>>,
    model: Model,
    mut progress: impl FnMut(&str),
) -> Result<Report, BacktestError> {
    let mut files = Vec::new();
    csv_files(dir, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(BacktestError::Empty(dir.into()));
    }
    let mut report = Report {
        threshold_score: univariate::PAGE_SCORE,
        series: Vec::new(),
        folders: BTreeMap::new(),
        total: BTreeMap::new(),
    };
    for file in files {
        let name = file.strip_prefix(dir).unwrap_or(&file).to_string_lossy().replace('\\', "/");
        let input = std::fs::File::open(&file).map_err(|source| BacktestError::Io { path: file.clone(), source })?;
        let rows = univariate::read_rows(std::io::BufReader::new(input))
            .map_err(|source| BacktestError::Series { path: file.clone(), source })?;
        let interval_ms = univariate::interval_ms(&rows);
        let chosen = model.resolve();
        let scores = univariate::score_rows(&rows, chosen, interval_ms);
        let times: Vec<i64> = rows.iter().map(|r| r.t_ms).collect();
        let labelled = windows.get(&name).map_or(&[][..], Vec::as_slice);
        let meshwatch: Vec<bool> = scores.iter().map(|&s| s >= univariate::PAGE_SCORE).collect();
        let gaussian = rolling_gaussian(&rows, interval_ms);
        let never = vec![false; rows.len()];
        let mut detectors = BTreeMap::new();
        for (detector, alarms) in DETECTORS.iter().zip([&meshwatch, &gaussian, &never]) {
            detectors.insert(*detector, judge(&times, alarms, labelled));
        }
        let folder = name.rsplit_once('/').map_or(".", |(f, _)| f).to_string();
        for (detector, outcome) in &detectors {
            report.folders.entry(folder.clone()).or_default().entry(detector).or_default().add(outcome);
            report.total.entry(detector).or_default().add(outcome);
        }
        progress(&name);
        report.series.push(SeriesReport {
            series: name,
            model: chosen.as_str(),
            interval_s: interval_ms as f64 / 1000.0,
            detectors,
        });
    }
    Ok(report)
}

fn line(label: &str, o: &Outcome) -> String {
    let median = o.median_first_alarm().map_or_else(|| "–".to_string(), |m| format!("{m:.2}"));
    format!(
        "  {label:<18} {:>5}/{:<5} {:>7} {:>9.2} {:>9.3} {:>6.3} {:>6.3} {:>8}",
        o.windows_hit,
        o.windows,
        o.false_events,
        o.false_events_per_1000_rows(),
        o.precision(),
        o.recall(),
        o.f1(),
        median
    )
}

/// The report as a table: per folder and in total, then the series with more than
/// `noisy_per_1000` false alarm events per 1,000 rows.
pub fn table(report: &Report, noisy_per_1000: f64) -> String {
    let mut s = format!(
        "meshwatch backtest (alarm at score ≥ {:.1}, i.e. p ≤ 1e-{:.0}; rolling Gaussian at |z| ≥ {GAUSSIAN_Z})\n",
        report.threshold_score, report.threshold_score
    );
    let header = format!(
        "  {:<18} {:>11} {:>7} {:>9} {:>9} {:>6} {:>6} {:>8}\n",
        "detector", "hit/windows", "false", "false/1k", "precision", "recall", "F1", "first@"
    );
    let groups = report.folders.iter().map(|(f, d)| (f.as_str(), d)).chain([("all series", &report.total)]);
    for (folder, detectors) in groups {
        s.push_str(&format!("{folder}\n{header}"));
        for (detector, outcome) in detectors {
            s.push_str(&line(detector, outcome));
            s.push('\n');
        }
    }
    let noisy: Vec<_> = report
        .series
        .iter()
        .filter(|r| r.detectors["meshwatch"].false_events_per_1000_rows() > noisy_per_1000)
        .collect();
    s.push_str(&format!("series with more than {noisy_per_1000} false alarm events per 1,000 rows: {}\n", noisy.len()));
    for r in noisy {
        let o = &r.detectors["meshwatch"];
        s.push_str(&format!("  {} ({}): {:.1}\n", r.series, r.model, o.false_events_per_1000_rows()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn times(n: i64) -> Vec<i64> {
        (0..n).map(|i| i * H).collect()
    }

    #[test]
    fn events_and_windows_counted_by_hand() {
        // 20 hourly rows; windows at rows 4–7 and row 15 (a single point), none at 10.
        let t = times(20);
        let windows = [(4 * H, 7 * H), (15 * H, 15 * H)];
        let mut alarms = vec![false; 20];
        // One event over rows 6–8 (overlaps the first window from row 6: fraction 2/3), one
        // false event at rows 10–11, one at row 18, none at 15 (missed).
        for i in [6, 7, 8, 10, 11, 18] {
            alarms[i] = true;
        }
        let o = judge(&t, &alarms, &windows);
        assert_eq!((o.rows, o.windows, o.windows_hit, o.false_events), (20, 2, 1, 2));
        assert_eq!(o.first_alarm_fractions, vec![2.0 / 3.0]);
        assert!((o.precision() - 1.0 / 3.0).abs() < 1e-12);
        assert!((o.recall() - 0.5).abs() < 1e-12);
        // 2·1 / (2·1 + 2 + 1)
        assert!((o.f1() - 0.4).abs() < 1e-12);
        assert!((o.false_events_per_1000_rows() - 100.0).abs() < 1e-12);
    }

    #[test]
    fn an_event_spanning_two_windows_hits_both_and_a_silent_detector_hits_none() {
        let t = times(10);
        let windows = [(2 * H, 3 * H), (4 * H, 5 * H)];
        let mut alarms = vec![false; 10];
        for a in &mut alarms[3..=4] {
            *a = true;
        }
        let o = judge(&t, &alarms, &windows);
        assert_eq!((o.windows_hit, o.false_events), (2, 0));
        assert_eq!(o.first_alarm_fractions, vec![1.0, 0.0]);
        let never = judge(&t, &[false; 10], &windows);
        assert_eq!((never.windows_hit, never.false_events, never.f1()), (0, 0, 0.0));
        // Nothing labelled and nothing raised is perfect; one false event is not.
        assert_eq!(judge(&t, &[false; 10], &[]).f1(), 1.0);
        let mut one = [false; 10];
        one[9] = true;
        assert_eq!(judge(&t, &one, &[]).f1(), 0.0);
    }

    #[test]
    fn the_rolling_gaussian_flags_a_spike_after_a_day_of_rows() {
        let rows: Vec<Row> = (0..60)
            .map(|i| Row { t_ms: i * H, value: if i == 40 { 100.0 } else { 10.0 + (i % 3) as f64 }, ts: String::new() })
            .collect();
        let alarms = rolling_gaussian(&rows, H);
        let flagged: Vec<usize> = alarms.iter().enumerate().filter(|(_, a)| **a).map(|(i, _)| i).collect();
        assert_eq!(flagged, vec![40]);
    }

    #[test]
    fn a_folder_of_labelled_series_is_backtested_per_folder() {
        let dir = std::env::temp_dir().join(format!("meshwatch-backtest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["shop", "quiet"] {
            std::fs::create_dir_all(dir.join(sub)).expect("folder");
        }
        // Hourly counts from 2024-01-01: a spike at row 100 inside the labelled window
        // (rows 99–102), and a calm series without labels.
        let series = |spike: bool| {
            let mut csv = String::from("timestamp,value\n");
            for i in 0..150 {
                let v = if spike && i == 100 { 900 } else { 100 + (i * 37 % 11) };
                csv.push_str(&format!("2024-01-{:02} {:02}:00:00,{v}\n", 1 + i / 24, i % 24));
            }
            csv
        };
        std::fs::write(dir.join("shop/orders.csv"), series(true)).expect("write");
        std::fs::write(dir.join("quiet/batch.csv"), series(false)).expect("write");
        let windows_file = dir.join("windows.json");
        // Row 99 is 2024-01-05 03:00, row 102 is 06:00.
        std::fs::write(&windows_file, r#"{"shop/orders.csv": [["2024-01-05 03:00:00", "2024-01-05 06:00:00"]]}"#)
            .expect("write");
        let windows = read_windows(&windows_file).expect("windows");
        let mut seen = Vec::new();
        let report = run(&dir, &windows, Model::Auto, |name| seen.push(name.to_string())).expect("backtest");
        assert_eq!(seen, vec!["quiet/batch.csv", "shop/orders.csv"]);
        let shop = &report.folders["shop"]["meshwatch"];
        assert_eq!((shop.rows, shop.windows, shop.windows_hit, shop.false_events), (150, 1, 1, 0));
        // The spike is the window's second row of four: a third of the way in.
        assert_eq!(shop.first_alarm_fractions, vec![1.0 / 3.0]);
        assert_eq!(report.folders["quiet"]["meshwatch"].false_events, 0);
        assert_eq!(report.total["never"].windows_hit, 0);
        assert_eq!(report.total["never"].windows, 1);
        assert_eq!(report.series[1].model, "rate");
        assert!(table(&report, 20.0).contains("series with more than 20 false alarm events per 1,000 rows: 0"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
