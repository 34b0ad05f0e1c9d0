//! Feature-flag evaluation: one implementation for the proxy (per request)
//! and OFREP (per API call), so both give the same answer for the same user.
//!
//! Order (DESIGN.md): `enabled: false` is off for everyone (the kill switch
//! beats everything, overrides included); an override for the user wins;
//! membership of a target group turns it on; otherwise on iff the user's
//! bucket, salted with the flag name, is below `rollout_percentage`.

use crate::bucket::{Salt, BUCKETS};
use crate::config::FlagConfig;

/// Why a flag evaluated as it did (OFREP's reason codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The kill switch is off.
    Disabled,
    /// A per-user override or a target group decided.
    TargetingMatch,
    /// The percentage rollout decided by the user's bucket.
    Split,
    /// No targeting and a rollout of 0 % or 100 %: the same for everyone.
    Static,
}

impl Reason {
    pub fn ofrep(self) -> &'static str {
        match self {
            Reason::Disabled => "DISABLED",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Split => "SPLIT",
            Reason::Static => "STATIC",
        }
    }
}

/// A flag prepared for evaluation on the request path.
#[derive(Debug, Clone)]
pub struct CompiledFlag {
    pub name: Box<str>,
    /// The name, hashed once as the bucket's salt.
    salt: Salt,
    enabled: bool,
    /// Rollout in buckets (hundredths of a percent).
    rollout: u32,
    groups: Box<[Box<str>]>,
    /// Per-user answers, sorted by user (the config's map is ordered):
    /// found by binary search, no hashing of the user's key per request.
    overrides: Box<[(Box<[u8]>, bool)]>,
}

impl CompiledFlag {
    pub fn new(flag: &FlagConfig) -> CompiledFlag {
        CompiledFlag {
            name: flag.name.as_str().into(),
            salt: Salt::new(&flag.name),
            enabled: flag.enabled,
            rollout: flag.rollout_percentage.basis_points(),
            groups: flag
                .target_groups
                .iter()
                .map(|g| g.as_str().into())
                .collect(),
            overrides: {
                let mut overrides: Vec<(Box<[u8]>, bool)> = flag
                    .overrides
                    .iter()
                    .map(|(user, on)| (user.as_bytes().into(), *on))
                    .collect();
                overrides.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                overrides.into()
            },
        }
    }

    /// Whether the evaluation needs the user's key (a percentage between 0
    /// and 100, or per-user overrides).
    pub fn needs_key(&self) -> bool {
        self.enabled && (!self.overrides.is_empty() || (self.rollout > 0 && self.rollout < BUCKETS))
    }

    /// Evaluates for the user `key` in `groups`.
    pub fn evaluate<'g>(
        &self,
        key: &[u8],
        groups: impl IntoIterator<Item = &'g str>,
    ) -> (bool, Reason) {
        if !self.enabled {
            return (false, Reason::Disabled);
        }
        if let Ok(i) = self
            .overrides
            .binary_search_by(|(user, _)| (**user).cmp(key))
        {
            return (self.overrides[i].1, Reason::TargetingMatch);
        }
        if !self.groups.is_empty()
            && groups
                .into_iter()
                .any(|g| self.groups.iter().any(|t| &**t == g))
        {
            return (true, Reason::TargetingMatch);
        }
        match self.rollout {
            0 if self.groups.is_empty() && self.overrides.is_empty() => (false, Reason::Static),
            BUCKETS if self.overrides.is_empty() => (true, Reason::Static),
            pct => (self.salt.bucket(key) < pct, Reason::Split),
        }
    }
}

/// The groups in a comma-separated header value (`beta, staff`).
pub fn parse_groups(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|g| !g.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Weight;

    fn flag(enabled: bool, pct: f64, groups: &[&str], overrides: &[(&str, bool)]) -> CompiledFlag {
        CompiledFlag::new(&FlagConfig {
            name: "career-selection-ai-v2".into(),
            enabled,
            rollout_percentage: Weight::from_percent(pct).unwrap(),
            target_groups: groups.iter().map(|g| g.to_string()).collect(),
            overrides: overrides.iter().map(|(u, b)| (u.to_string(), *b)).collect(),
            description: None,
            metrics: Vec::new(),
        })
    }

    #[test]
    fn every_override_is_found_among_many() {
        let users: Vec<(String, bool)> = (0..100)
            .map(|i| (format!("user-{i}"), i % 3 == 0))
            .collect();
        let overrides: Vec<(&str, bool)> = users.iter().map(|(u, on)| (u.as_str(), *on)).collect();
        let f = flag(true, 50.0, &[], &overrides);
        for (user, on) in &users {
            assert_eq!(
                f.evaluate(user.as_bytes(), []),
                (*on, Reason::TargetingMatch),
                "{user}"
            );
        }
        let (_, reason) = f.evaluate(b"user-100", []);
        assert_eq!(
            reason,
            Reason::Split,
            "not overridden: the percentage decides"
        );
    }

    #[test]
    fn kill_switch_beats_everything_even_an_override() {
        let f = flag(false, 100.0, &["beta"], &[("user-123", true)]);
        assert_eq!(f.evaluate(b"user-123", ["beta"]), (false, Reason::Disabled));
        assert_eq!(f.evaluate(b"anyone", []), (false, Reason::Disabled));
    }

    #[test]
    fn an_override_wins_over_groups_and_percentage() {
        let f = flag(
            true,
            100.0,
            &["beta"],
            &[("user-123", false), ("user-9", true)],
        );
        assert_eq!(
            f.evaluate(b"user-123", ["beta"]),
            (false, Reason::TargetingMatch)
        );
        let f = flag(true, 0.0, &[], &[("user-9", true)]);
        assert_eq!(f.evaluate(b"user-9", []), (true, Reason::TargetingMatch));
    }

    #[test]
    fn a_target_group_turns_it_on() {
        let f = flag(true, 0.0, &["beta", "staff"], &[]);
        assert_eq!(
            f.evaluate(b"u", parse_groups("x, staff")),
            (true, Reason::TargetingMatch)
        );
        assert_eq!(
            f.evaluate(b"u", parse_groups("x,betas")),
            (false, Reason::Split)
        );
    }

    #[test]
    fn percentage_uses_the_flag_salted_bucket() {
        // bucket("career-selection-ai-v2", "user-123") is 7817 (docs/split.md).
        assert_eq!(
            flag(true, 78.18, &[], &[]).evaluate(b"user-123", []),
            (true, Reason::Split)
        );
        assert_eq!(
            flag(true, 78.17, &[], &[]).evaluate(b"user-123", []),
            (false, Reason::Split)
        );
        assert_eq!(
            flag(true, 0.0, &[], &[]).evaluate(b"x", []),
            (false, Reason::Static)
        );
        assert_eq!(
            flag(true, 100.0, &[], &[]).evaluate(b"x", []),
            (true, Reason::Static)
        );
    }

    #[test]
    fn ten_percent_of_50000_users_is_within_half_a_point() {
        let f = flag(true, 10.0, &[], &[]);
        let on = (0..50_000)
            .filter(|i| f.evaluate(format!("user-{i}").as_bytes(), []).0)
            .count();
        let pct = on as f64 / 500.0;
        assert!((9.5..=10.5).contains(&pct), "{pct}%");
    }
}
