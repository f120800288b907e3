//! `single-profile-handler`: runs the only profile once and makes it primary
//! (GIE v1.5.0 `framework/plugins/scheduling/profile/single_profile_handler.go`).

use super::{Plugin, ProfileHandler, ProfileOutcome};
use crate::epp::scheduling::ScheduleError;

#[derive(Debug)]
pub struct SingleProfileHandler {
    pub name: String,
}

impl Plugin for SingleProfileHandler {
    fn plugin_type(&self) -> &'static str {
        "single-profile-handler"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl ProfileHandler for SingleProfileHandler {
    fn pick_profiles(&self, outcomes: &[ProfileOutcome], next: &mut Vec<usize>) {
        // Run everything not yet run; the second call finds nothing left and ends the cycle.
        next.extend(
            outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| **o == ProfileOutcome::NotRun)
                .map(|(i, _)| i),
        );
    }

    fn process_results(
        &self,
        profile_names: &[String],
        outcomes: &[ProfileOutcome],
    ) -> Result<usize, ScheduleError> {
        let mut ran = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| **o != ProfileOutcome::NotRun);
        match (ran.next(), ran.next()) {
            (Some((i, ProfileOutcome::Picked)), None) => Ok(i),
            (Some((i, _)), None) => Err(ScheduleError::ProfileFailed {
                profile: profile_names.get(i).cloned().unwrap_or_default(),
            }),
            _ => Err(ScheduleError::MultipleProfiles),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_profile_flow() {
        let h = SingleProfileHandler { name: "h".into() };
        let names = vec!["default".to_string()];
        let mut next = Vec::new();
        h.pick_profiles(&[ProfileOutcome::NotRun], &mut next);
        assert_eq!(next, vec![0]);
        next.clear();
        h.pick_profiles(&[ProfileOutcome::Picked], &mut next);
        assert!(next.is_empty());
        assert_eq!(
            h.process_results(&names, &[ProfileOutcome::Picked])
                .unwrap(),
            0
        );
        assert_eq!(
            h.process_results(&names, &[ProfileOutcome::Failed])
                .unwrap_err()
                .to_string(),
            "failed to run scheduler profile 'default'"
        );
        assert!(matches!(
            h.process_results(&names, &[ProfileOutcome::NotRun]),
            Err(ScheduleError::MultipleProfiles)
        ));
    }
}
