//! Percentiles and medians over latencies, and their formatting.

/// Latencies of one rotation over its streams, in µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    /// `None` when there are no samples.
    pub fn of(samples: &mut [f64]) -> Option<Spread> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        Some(Spread { p50: percentile(samples, 50.0), p99: percentile(samples, 99.0), max: samples[samples.len() - 1] })
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of the values (mean of the middle two for an even count); NaN when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

/// µs as milliseconds with a sensible number of digits; "-" for NaN.
pub fn ms(us: f64) -> String {
    if us.is_nan() {
        return "-".into();
    }
    let ms = us / 1e3;
    if ms.abs() >= 100.0 {
        format!("{ms:.0}")
    } else if ms.abs() >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// A plain number with up to `digits` decimals; "-" for NaN.
pub fn num(x: f64, digits: usize) -> String {
    if x.is_nan() { "-".into() } else { format!("{x:.digits$}") }
}

/// `a / b` as "0.42×"; "-" when either is missing.
pub fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 { "-".into() } else { format!("{:.2}×", a / b) }
}
