//! Distribution tails the scorers need. Pure functions of numbers, no state.

/// erfc(x), Numerical Recipes' Chebyshev fit (`erfcc`), fractional error below 1.2e-7.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// P(Z ≥ z) for a standard normal Z.
pub fn normal_sf(z: f64) -> f64 {
    if z.is_nan() {
        return 1.0;
    }
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9), for log-space tails.
pub fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// ln P(X = k) for X ~ Poisson(λ).
fn ln_poisson_pmf(k: u64, lambda: f64) -> f64 {
    k as f64 * lambda.ln() - lambda - ln_gamma(k as f64 + 1.0)
}

/// P(X ≥ k) for X ~ Poisson(λ), summed in log space from k upward (terms shrink fast once
/// past the mean). Used for upper tails where k > λ.
pub fn poisson_upper_tail(k: u64, lambda: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if lambda <= 0.0 {
        return 0.0;
    }
    if (k as f64) <= lambda {
        // Sum the lower part directly, from 0 (k is at most λ here, so few terms matter).
        let mut log_term = -lambda;
        let mut lower = 0.0;
        for i in 0..k {
            if i > 0 {
                log_term += lambda.ln() - (i as f64).ln();
            }
            lower += log_term.exp();
        }
        return (1.0 - lower).clamp(0.0, 1.0);
    }
    let mut log_term = ln_poisson_pmf(k, lambda);
    let mut sum = 0.0;
    let mut i = k;
    loop {
        let term = log_term.exp();
        sum += term;
        i += 1;
        log_term += lambda.ln() - (i as f64).ln();
        if term < sum * 1e-12 || i > k + 10_000 {
            break;
        }
    }
    sum.min(1.0)
}

/// P(X ≤ k) for X ~ Poisson(λ), summed in log space from k downward (terms shrink fast
/// below the mean).
pub fn poisson_lower_tail(k: u64, lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 1.0;
    }
    if k as f64 >= lambda {
        return 1.0 - poisson_upper_tail(k + 1, lambda);
    }
    let mut log_term = ln_poisson_pmf(k, lambda);
    let mut sum = 0.0;
    let mut i = k;
    loop {
        let term = log_term.exp();
        sum += term;
        if i == 0 || term < sum * 1e-12 {
            break;
        }
        log_term += (i as f64).ln() - lambda.ln();
        i -= 1;
    }
    sum.min(1.0)
}

/// ln P(X = k) for X ~ negative binomial with mean μ and shape r (variance μ + μ²/r): a
/// Poisson whose rate is itself uncertain (Gamma with relative variance 1/r).
fn ln_nb_pmf(k: u64, mu: f64, r: f64) -> f64 {
    let k = k as f64;
    ln_gamma(k + r) - ln_gamma(r) - ln_gamma(k + 1.0) + r * (r / (r + mu)).ln() + k * (mu / (r + mu)).ln()
}

/// P(X ≥ k) for X ~ negative binomial (mean μ, shape r), summed from k upward (or the
/// complement below the mean).
pub fn nb_upper_tail(k: u64, mu: f64, r: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if mu <= 0.0 {
        return 0.0;
    }
    if (k as f64) <= mu {
        return (1.0 - nb_lower_tail(k - 1, mu, r)).clamp(0.0, 1.0);
    }
    let q = mu / (r + mu);
    let mut term = ln_nb_pmf(k, mu, r).exp();
    let mut sum = 0.0;
    let mut i = k as f64;
    loop {
        sum += term;
        term *= (i + r) / (i + 1.0) * q;
        i += 1.0;
        if term < sum * 1e-12 || i > k as f64 + 100_000.0 {
            break;
        }
    }
    sum.min(1.0)
}

/// P(X ≤ k) for X ~ negative binomial (mean μ, shape r), summed from k downward (or the
/// complement above the mean).
pub fn nb_lower_tail(k: u64, mu: f64, r: f64) -> f64 {
    if mu <= 0.0 {
        return 1.0;
    }
    if k as f64 >= mu {
        return (1.0 - nb_upper_tail(k + 1, mu, r)).clamp(0.0, 1.0);
    }
    let q = mu / (r + mu);
    let mut term = ln_nb_pmf(k, mu, r).exp();
    let mut sum = 0.0;
    let mut i = k as f64;
    loop {
        sum += term;
        if i == 0.0 || term < sum * 1e-12 {
            break;
        }
        // pmf(i − 1) = pmf(i) · i / ((i − 1 + r) q)
        term *= i / ((i - 1.0 + r) * q);
        i -= 1.0;
    }
    sum.min(1.0)
}

/// P(X ≥ k) for X ~ Binomial(n, p), in log space.
pub fn binomial_upper_tail(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (nf, lp, lq) = (n as f64, p.ln(), (1.0 - p).ln());
    let ln_choose = |i: u64| ln_gamma(nf + 1.0) - ln_gamma(i as f64 + 1.0) - ln_gamma((n - i) as f64 + 1.0);
    let mut sum = 0.0;
    for i in k..=n {
        let term = (ln_choose(i) + i as f64 * lp + (n - i) as f64 * lq).exp();
        sum += term;
        if term < sum * 1e-12 && i as f64 > nf * p {
            break;
        }
    }
    sum.min(1.0)
}

/// ln B(a, b), the beta function.
fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// P(X ≥ k) for X ~ beta-binomial(n, a, b): a binomial whose probability is itself uncertain,
/// Beta(a, b) (mean a / (a + b); variance of X is n·p·q·(a + b + n) / (a + b + 1)). Summed
/// from k upward (the pmf falls from there once k is above the mean), or the complement below
/// the mean.
pub fn beta_binomial_upper_tail(k: u64, n: u64, a: f64, b: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || a <= 0.0 {
        return 0.0;
    }
    if b <= 0.0 {
        return 1.0;
    }
    let nf = n as f64;
    let ln_pmf = |i: f64| {
        ln_gamma(nf + 1.0) - ln_gamma(i + 1.0) - ln_gamma(nf - i + 1.0) + ln_beta(i + a, nf - i + b) - ln_beta(a, b)
    };
    let mean = nf * a / (a + b);
    let (from, to, upward) = if (k as f64) > mean { (k, n, true) } else { (0, k - 1, false) };
    let mut sum = 0.0;
    let mut i = if upward { from } else { to } as f64;
    let mut term = ln_pmf(i).exp();
    loop {
        sum += term;
        let last = if upward { i >= to as f64 } else { i <= from as f64 };
        if last || term < sum * 1e-12 {
            break;
        }
        // pmf(i + 1) / pmf(i) = (n − i)(i + a) / ((i + 1)(n − i − 1 + b)), and its inverse.
        if upward {
            term *= (nf - i) * (i + a) / ((i + 1.0) * (nf - i - 1.0 + b));
            i += 1.0;
        } else {
            term *= i * (nf - i + b) / ((nf - i + 1.0) * (i - 1.0 + a));
            i -= 1.0;
        }
    }
    if upward { sum.min(1.0) } else { (1.0 - sum).clamp(0.0, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn normal_tail_known_values() {
        assert!(close(normal_sf(0.0), 0.5, 1e-6));
        assert!(close(normal_sf(1.959_964), 0.025, 1e-5));
        assert!(close(normal_sf(5.0), 2.866_515_7e-7, 1e-5));
        assert!(close(normal_sf(-3.0), 0.998_650_1, 1e-6));
    }

    #[test]
    fn gamma_and_tails_known_values() {
        assert!(close(ln_gamma(10.0), 362_880f64.ln(), 1e-10));
        assert!(close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-10));
        // P(X ≥ 10 | λ = 3) = 0.001102488
        assert!(close(poisson_upper_tail(10, 3.0), 0.001_102_488, 1e-5));
        assert!(close(poisson_lower_tail(0, 3.0), (-3.0f64).exp(), 1e-12));
        // P(X ≤ 15 | λ = 50) = 6.358e-9 (the normal approximation is off by orders here).
        assert!(close(poisson_lower_tail(15, 50.0), 6.358e-9, 1e-3));
        assert!(close(poisson_lower_tail(60, 50.0), 0.927_84, 1e-4));
        assert!(close(poisson_upper_tail(2, 3.0), 1.0 - 4.0 * (-3.0f64).exp(), 1e-9));
        // P(X ≥ 3 | n = 4, p = 0.001) ≈ 4e-9: three errors in four requests at a 0.1 % base.
        assert!(close(binomial_upper_tail(3, 4, 0.001), 3.996e-9, 1e-3));
        assert!(close(binomial_upper_tail(1, 1, 0.5), 0.5, 1e-12));
        assert_eq!(binomial_upper_tail(0, 10, 0.1), 1.0);
    }

    #[test]
    fn beta_binomial_tails_known_values() {
        // Beta(1, 1) is uniform: every count of n is equally likely, 1 / (n + 1).
        assert!(close(beta_binomial_upper_tail(7, 9, 1.0, 1.0), 0.3, 1e-9));
        assert!(close(beta_binomial_upper_tail(2, 9, 1.0, 1.0), 0.8, 1e-9));
        // A very sure probability is binomial.
        assert!(close(beta_binomial_upper_tail(3, 4, 1e6, 999e6), 3.996e-9, 1e-3));
        assert!(close(beta_binomial_upper_tail(12, 100, 5e8, 4.5e9), binomial_upper_tail(12, 100, 0.1), 1e-4));
        // An uncertain one makes the tail heavier.
        assert!(beta_binomial_upper_tail(3, 4, 0.1, 99.9) > 100.0 * binomial_upper_tail(3, 4, 0.001));
        assert!(close(beta_binomial_upper_tail(3, 30, 0.02, 100.0), 9.478_44e-5, 1e-5));
        assert_eq!(beta_binomial_upper_tail(0, 4, 1.0, 1.0), 1.0);
        assert_eq!(beta_binomial_upper_tail(5, 4, 1.0, 1.0), 0.0);
    }

    #[test]
    fn negative_binomial_tails_known_values() {
        // Shape 1 is geometric: P(X ≥ k) = q^k with q = μ / (1 + μ).
        assert!(close(nb_upper_tail(10, 3.0, 1.0), 0.75f64.powi(10), 1e-9));
        assert!(close(nb_lower_tail(2, 3.0, 1.0), 1.0 - 0.75f64.powi(3), 1e-9));
        assert!(close(nb_lower_tail(0, 40.0, 25.0), (25.0f64 / 65.0).powi(25), 1e-9));
        // A very large shape is Poisson.
        assert!(close(nb_lower_tail(15, 50.0, 1e7), 6.358e-9, 1e-2));
        assert!(close(nb_upper_tail(10, 3.0, 1e7), 0.001_102_488, 1e-3));
        // The uncertain rate makes both tails heavier than Poisson's.
        assert!(nb_lower_tail(12, 40.0, 44.0) > 100.0 * poisson_lower_tail(12, 40.0));
        assert!(nb_upper_tail(70, 40.0, 44.0) > 100.0 * poisson_upper_tail(70, 40.0));
        assert_eq!(nb_upper_tail(0, 5.0, 2.0), 1.0);
    }
}
