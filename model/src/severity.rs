//! Severity as likelihood × impact.
//!
//! Impact measures what is at stake at the target of a deviation, likelihood how easily the
//! deviation can be exploited or how likely it is to mean an attack. Both are coarse on purpose:
//! the inputs (criticality, trust, exposure) are coarse too.
//!
//! | likelihood \ impact | low      | medium   | high     | critical |
//! |---------------------|----------|----------|----------|----------|
//! | low                 | low      | low      | medium   | elevated |
//! | moderate            | low      | medium   | elevated | high     |
//! | high                | medium   | elevated | high     | critical |

use crate::deviation::Severity;
use crate::model::{Criticality, Zone};

/// The likelihood that a deviation is exploited or means an attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Likelihood {
    Low = 0,
    Moderate = 1,
    High = 2,
}

impl Likelihood {
    /// Returns the next level up, saturating at `High`.
    pub fn raised(self) -> Likelihood {
        match self {
            Likelihood::Low => Likelihood::Moderate,
            Likelihood::Moderate | Likelihood::High => Likelihood::High,
        }
    }
}

/// The damage at stake at the target of a deviation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Impact {
    Low = 0,
    Medium = 1,
    High = 2,
    Critical = 3,
}

impl Impact {
    pub fn of_criticality(criticality: Criticality) -> Impact {
        match criticality {
            Criticality::Low => Impact::Low,
            Criticality::Medium => Impact::Medium,
            Criticality::High => Impact::High,
            Criticality::Critical => Impact::Critical,
        }
    }

    /// Impact of reaching a zone: trust 0-24 low, 25-49 medium, 50-79 high, 80-100 critical.
    pub fn of_trust(trust: u8) -> Impact {
        match trust {
            0..=24 => Impact::Low,
            25..=49 => Impact::Medium,
            50..=79 => Impact::High,
            _ => Impact::Critical,
        }
    }
}

/// Zones at or below this trust count as untrusted sources, which raises likelihood.
pub const UNTRUSTED_BELOW: u8 = 25;

pub fn is_untrusted(zone: &Zone) -> bool {
    zone.trust < UNTRUSTED_BELOW
}

/// Rows are likelihood (low, moderate, high), columns impact (low, medium, high, critical).
const TABLE: [[Severity; 4]; 3] = [
    [
        Severity::Low,
        Severity::Low,
        Severity::Medium,
        Severity::Elevated,
    ],
    [
        Severity::Low,
        Severity::Medium,
        Severity::Elevated,
        Severity::High,
    ],
    [
        Severity::Medium,
        Severity::Elevated,
        Severity::High,
        Severity::Critical,
    ],
];

/// Looks up the severity for a likelihood and an impact in the table above.
pub fn assess(likelihood: Likelihood, impact: Impact) -> Severity {
    TABLE[likelihood as usize][impact as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_table_corners() {
        assert_eq!(assess(Likelihood::Low, Impact::Low), Severity::Low);
        assert_eq!(
            assess(Likelihood::High, Impact::Critical),
            Severity::Critical
        );
        assert_eq!(
            assess(Likelihood::Low, Impact::Critical),
            Severity::Elevated
        );
        assert_eq!(assess(Likelihood::High, Impact::Low), Severity::Medium);
        assert_eq!(
            assess(Likelihood::Moderate, Impact::Medium),
            Severity::Medium
        );
        assert_eq!(
            assess(Likelihood::Moderate, Impact::High),
            Severity::Elevated
        );
    }

    #[test]
    fn severity_never_falls_as_inputs_rise() {
        let likelihoods = [Likelihood::Low, Likelihood::Moderate, Likelihood::High];
        let impacts = [Impact::Low, Impact::Medium, Impact::High, Impact::Critical];
        for (l, &likelihood) in likelihoods.iter().enumerate() {
            for (i, &impact) in impacts.iter().enumerate() {
                let severity = assess(likelihood, impact);
                if l + 1 < likelihoods.len() {
                    assert!(
                        assess(likelihoods[l + 1], impact) >= severity,
                        "{likelihood:?} {impact:?}"
                    );
                }
                if i + 1 < impacts.len() {
                    assert!(
                        assess(likelihood, impacts[i + 1]) >= severity,
                        "{likelihood:?} {impact:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn severity_table_uses_all_five_levels() {
        let mut seen: Vec<Severity> = TABLE.iter().flatten().copied().collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, Severity::ALL.to_vec());
    }

    #[test]
    fn trust_maps_to_impact_bands() {
        assert_eq!(Impact::of_trust(0), Impact::Low);
        assert_eq!(Impact::of_trust(24), Impact::Low);
        assert_eq!(Impact::of_trust(25), Impact::Medium);
        assert_eq!(Impact::of_trust(50), Impact::High);
        assert_eq!(Impact::of_trust(80), Impact::Critical);
        assert_eq!(Impact::of_trust(100), Impact::Critical);
    }

    #[test]
    fn likelihood_raise_saturates() {
        assert_eq!(Likelihood::Low.raised(), Likelihood::Moderate);
        assert_eq!(Likelihood::Moderate.raised(), Likelihood::High);
        assert_eq!(Likelihood::High.raised(), Likelihood::High);
    }
}
