//! Rate control of a run: how many executions may be in flight at once (`max_concurrency`) and
//! how many may fail before the rest are skipped (`max_errors`), each a count or a percentage of
//! the run's targets, as AWS SSM has them.

use std::fmt;

/// A count (`10`) or a percentage of the run's targets (`25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    Count(u64),
    Percent(u8),
}

impl RateLimit {
    /// Parses `10` or `25%`. `minimum` is the smallest count allowed (1 for concurrency, 0 for
    /// errors); percentages run from 1 to 100 (0% for errors is written `0`).
    pub fn parse(text: &str, minimum: u64) -> Result<Self, String> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            return match percent.trim().parse::<u8>() {
                Ok(percent @ 1..=100) => Ok(RateLimit::Percent(percent)),
                _ => Err(format!("`{text}` is not a percentage from 1% to 100%")),
            };
        }
        match text.parse::<u64>() {
            Ok(count) if count >= minimum => Ok(RateLimit::Count(count)),
            Ok(_) => Err(format!("`{text}` is below the minimum of {minimum}")),
            Err(_) => Err(format!(
                "`{text}` is neither a count such as 10 nor a percentage such as 25%"
            )),
        }
    }

    /// The limit as a count, for a run of `total` executions. Percentages round up, so that a
    /// percentage of concurrency never comes to zero.
    pub fn resolve(self, total: u64) -> u64 {
        match self {
            RateLimit::Count(count) => count,
            RateLimit::Percent(percent) => (total * u64::from(percent)).div_ceil(100),
        }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimit::Count(count) => write!(f, "{count}"),
            RateLimit::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

/// Where a rate-limited run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunProgress {
    pub total: u64,
    /// Released to their machines and not yet terminal.
    pub in_flight: u64,
    /// Terminal in a state that counts as an error: failed, timed out, delivery timed out,
    /// interrupted.
    pub errors: u64,
    /// Pending and not yet released.
    pub held_back: u64,
}

/// What to do next with a rate-limited run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStep {
    /// Release this many more executions (possibly zero).
    Release(u64),
    /// Too many errors: skip everything held back, and say why.
    Stop(String),
}

/// Decides the next step of a run under `max_concurrency` and `max_errors`: once more
/// executions than `max_errors` have failed, the ones not yet sent are skipped; otherwise, up to
/// `max_concurrency` are kept in flight.
pub fn next_step(
    progress: RunProgress,
    max_concurrency: Option<RateLimit>,
    max_errors: Option<RateLimit>,
) -> RunStep {
    if let Some(max_errors) = max_errors {
        let allowed = match max_errors {
            // A percentage of errors rounds down: 10% of 5 targets allows none.
            RateLimit::Percent(percent) => progress.total * u64::from(percent) / 100,
            RateLimit::Count(count) => count,
        };
        if progress.errors > allowed && progress.held_back > 0 {
            return RunStep::Stop(format!(
                "max_errors reached: {} executions failed, more than the {allowed} allowed \
                 (max_errors {max_errors}); the {} not yet sent were skipped",
                progress.errors, progress.held_back
            ));
        }
    }
    let window = max_concurrency.map_or(u64::MAX, |limit| limit.resolve(progress.total).max(1));
    RunStep::Release(
        window
            .saturating_sub(progress.in_flight)
            .min(progress.held_back),
    )
}

/// Whether a terminal state counts against `max_errors`.
pub fn is_error(state: crate::ExecutionState) -> bool {
    use crate::ExecutionState::*;
    matches!(state, Failed | TimedOut | DeliveryTimedOut | Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(total: u64, in_flight: u64, errors: u64, held_back: u64) -> RunProgress {
        RunProgress {
            total,
            in_flight,
            errors,
            held_back,
        }
    }

    #[test]
    fn parses_counts_and_percentages() {
        assert_eq!(RateLimit::parse("10", 1), Ok(RateLimit::Count(10)));
        assert_eq!(RateLimit::parse("25%", 1), Ok(RateLimit::Percent(25)));
        assert_eq!(RateLimit::parse("0", 0), Ok(RateLimit::Count(0)));
        assert!(RateLimit::parse("0", 1).is_err());
        assert!(RateLimit::parse("0%", 0).is_err());
        assert!(RateLimit::parse("101%", 1).is_err());
        assert!(RateLimit::parse("ten", 1).is_err());
        assert!(RateLimit::parse("-1", 0).is_err());
    }

    #[test]
    fn concurrency_keeps_the_window_full() {
        let c = Some(RateLimit::Count(3));
        assert_eq!(
            next_step(progress(10, 0, 0, 10), c, None),
            RunStep::Release(3)
        );
        assert_eq!(
            next_step(progress(10, 2, 0, 7), c, None),
            RunStep::Release(1)
        );
        assert_eq!(
            next_step(progress(10, 3, 0, 6), c, None),
            RunStep::Release(0)
        );
        assert_eq!(
            next_step(progress(10, 1, 0, 1), c, None),
            RunStep::Release(1)
        );
        assert_eq!(
            next_step(progress(10, 0, 0, 10), None, None),
            RunStep::Release(10)
        );
        // 10% of 15 rounds up to 2.
        assert_eq!(
            next_step(progress(15, 0, 0, 15), Some(RateLimit::Percent(10)), None),
            RunStep::Release(2)
        );
    }

    #[test]
    fn errors_past_the_threshold_stop_the_rest() {
        let e = Some(RateLimit::Count(1));
        assert_eq!(
            next_step(progress(10, 1, 1, 5), None, e),
            RunStep::Release(5)
        );
        assert!(matches!(
            next_step(progress(10, 1, 2, 5), None, e),
            RunStep::Stop(_)
        ));
        // Nothing left to skip: nothing to stop.
        assert_eq!(
            next_step(progress(10, 1, 2, 0), None, e),
            RunStep::Release(0)
        );
        // Zero errors allowed: the first one stops it.
        assert!(matches!(
            next_step(progress(10, 1, 1, 5), None, Some(RateLimit::Count(0))),
            RunStep::Stop(_)
        ));
        // 10% of 5 allows none.
        assert!(matches!(
            next_step(progress(5, 0, 1, 3), None, Some(RateLimit::Percent(10))),
            RunStep::Stop(_)
        ));
    }
}
