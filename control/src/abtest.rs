//! Whether two cohorts' error rates differ beyond noise: the two-proportion
//! z-test (pooled), two-sided. Enough to keep an operator from reading 3
//! errors in 40 requests as a regression, and from missing a real one.

use serde::Serialize;

/// What the test says about error rates `a` (errors/requests) against `b`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Difference {
    /// `a`'s rate minus `b`'s, in percentage points.
    pub points: f64,
    /// The test statistic.
    pub z: f64,
    /// Two-sided: the chance of a difference at least this large if the
    /// rates were the same.
    pub p_value: f64,
    /// `p_value` below 0.05.
    pub beyond_noise: bool,
}

/// `None` while either cohort has no requests.
pub fn two_proportions(
    errors_a: u64,
    requests_a: u64,
    errors_b: u64,
    requests_b: u64,
) -> Option<Difference> {
    if requests_a == 0 || requests_b == 0 {
        return None;
    }
    let (ea, na, eb, nb) = (
        errors_a as f64,
        requests_a as f64,
        errors_b as f64,
        requests_b as f64,
    );
    let (pa, pb) = (ea / na, eb / nb);
    let pooled = (ea + eb) / (na + nb);
    let se = (pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb)).sqrt();
    // Both all-clean or both all-failing: no difference to see.
    let z = if se > 0.0 { (pa - pb) / se } else { 0.0 };
    let p_value = (2.0 * (1.0 - normal_cdf(z.abs()))).clamp(0.0, 1.0);
    Some(Difference {
        points: (pa - pb) * 100.0,
        z,
        p_value,
        beyond_noise: p_value < 0.05,
    })
}

/// The standard normal distribution function, from erf (Abramowitz and
/// Stegun 7.1.26, absolute error under 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

fn erf(x: f64) -> f64 {
    let sign = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    sign * (1.0 - poly * (-x * x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_samples_are_noise_large_differences_are_not() {
        // 3 errors in 40 against none in 40: p ≈ 0.077, not beyond noise.
        let d = two_proportions(3, 40, 0, 40).unwrap();
        assert!((d.p_value - 0.077).abs() < 0.005, "{d:?}");
        assert!(!d.beyond_noise);
        assert!((d.points - 7.5).abs() < 1e-9);
        // 30 % against 10 % over 100 each: z ≈ 3.54, p ≈ 0.0004.
        let d = two_proportions(30, 100, 10, 100).unwrap();
        assert!((d.z - 3.536).abs() < 0.01, "{d:?}");
        assert!(d.p_value < 0.001 && d.beyond_noise, "{d:?}");
        // The same rates: z 0, p 1.
        let d = two_proportions(5, 100, 10, 200).unwrap();
        assert!(d.z.abs() < 1e-12 && (d.p_value - 1.0).abs() < 1e-6, "{d:?}");
        // Both clean: nothing to see.
        let d = two_proportions(0, 50, 0, 70).unwrap();
        assert!(!d.beyond_noise && d.p_value > 0.999, "{d:?}");
        assert_eq!(two_proportions(1, 0, 0, 10), None);
    }

    #[test]
    fn the_normal_distribution_function_matches_its_table() {
        for (x, phi) in [
            (0.0, 0.5),
            (1.0, 0.841_345),
            (1.96, 0.975_002),
            (-2.576, 0.004_998),
        ] {
            assert!((normal_cdf(x) - phi).abs() < 1e-5, "{x}");
        }
    }
}
