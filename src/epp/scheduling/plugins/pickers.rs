//! Pickers (GIE v1.5.0 `framework/plugins/scheduling/picker/*`): max score with random
//! tie-break, uniform random, and weighted random (A-Res keys `U^(1/score)`).

use rand::{Rng, RngCore};

use super::{Picker, Plugin, Scored};

/// Descending by score; NaN never occurs (scores are clamped sums of finite weights).
fn by_score_desc(a: &Scored, b: &Scored) -> std::cmp::Ordering {
    b.score.total_cmp(&a.score)
}

/// Moves `k` uniformly chosen elements to the front, in random order (partial Fisher–Yates).
fn shuffle_front(scored: &mut [Scored], k: usize, rng: &mut dyn RngCore) {
    let n = scored.len();
    for i in 0..k.min(n) {
        let j = rng.random_range(i..n);
        scored.swap(i, j);
    }
}

/// `max-score-picker`: highest total score wins; ties are broken uniformly at random (a fixed
/// tie-break sends all traffic at equal scores to one endpoint).
#[derive(Debug)]
pub struct MaxScorePicker {
    pub name: String,
    pub max_num_of_endpoints: usize,
}

impl Plugin for MaxScorePicker {
    fn plugin_type(&self) -> &'static str {
        "max-score-picker"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Picker for MaxScorePicker {
    fn pick(&self, scored: &mut [Scored], rng: &mut dyn RngCore) -> usize {
        let n = scored.len();
        if n == 0 {
            return 0;
        }
        let k = self.max_num_of_endpoints.clamp(1, n);
        if k == 1 {
            // One pass, reservoir-sampling among the ties: no allocation, no sort.
            let (mut best, mut ties) = (0usize, 1u32);
            for i in 1..n {
                let (s, b) = (scored[i].score, scored[best].score);
                if s > b {
                    best = i;
                    ties = 1;
                } else if s == b {
                    ties += 1;
                    if rng.random_range(0..ties) == 0 {
                        best = i;
                    }
                }
            }
            scored.swap(0, best);
            return 1;
        }
        // As the reference: shuffle, then a stable sort keeps the random order among ties.
        shuffle_front(scored, n, rng);
        scored.sort_by(by_score_desc);
        k
    }
}

/// `random-picker`: uniform choice, ignoring scores.
#[derive(Debug)]
pub struct RandomPicker {
    pub name: String,
    pub max_num_of_endpoints: usize,
}

impl Plugin for RandomPicker {
    fn plugin_type(&self) -> &'static str {
        "random-picker"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Picker for RandomPicker {
    fn pick(&self, scored: &mut [Scored], rng: &mut dyn RngCore) -> usize {
        let k = self
            .max_num_of_endpoints
            .clamp(1, scored.len().max(1))
            .min(scored.len());
        shuffle_front(scored, k, rng);
        k
    }
}

/// `weighted-random-picker`: each endpoint with score > 0 draws key `U^(1/score)`, highest keys
/// win (weighted sampling without replacement); all scores zero → uniform random.
#[derive(Debug)]
pub struct WeightedRandomPicker {
    pub name: String,
    pub max_num_of_endpoints: usize,
}

impl Plugin for WeightedRandomPicker {
    fn plugin_type(&self) -> &'static str {
        "weighted-random-picker"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Picker for WeightedRandomPicker {
    fn pick(&self, scored: &mut [Scored], rng: &mut dyn RngCore) -> usize {
        let n = scored.len();
        let k = self.max_num_of_endpoints.clamp(1, n.max(1)).min(n);
        if !scored.iter().any(|s| s.score > 0.0) {
            shuffle_front(scored, k, rng);
            return k;
        }
        let mut keyed: Vec<(f64, Scored)> = scored
            .iter()
            .map(|&s| {
                let key = if s.score > 0.0 {
                    let u: f64 = rng.random();
                    // Avoid 0^(1/w) ties at zero, as the reference does.
                    let u = if u == 0.0 { 1e-10 } else { u };
                    u.powf(1.0 / s.score)
                } else {
                    0.0
                };
                (key, s)
            })
            .collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (dst, (_, s)) in scored.iter_mut().zip(keyed) {
            *dst = s;
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn scored(scores: &[f64]) -> Vec<Scored> {
        scores
            .iter()
            .enumerate()
            .map(|(index, &score)| Scored { index, score })
            .collect()
    }

    fn counts(p: &dyn Picker, scores: &[f64], rounds: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut c = vec![0; scores.len()];
        for _ in 0..rounds {
            let mut s = scored(scores);
            assert_eq!(p.pick(&mut s, &mut rng), 1);
            c[s[0].index] += 1;
        }
        c
    }

    #[test]
    fn max_score_picks_the_highest() {
        let p = MaxScorePicker {
            name: "m".into(),
            max_num_of_endpoints: 1,
        };
        assert_eq!(counts(&p, &[0.1, 2.2, 1.15], 100), vec![0, 100, 0]);
    }

    #[test]
    fn max_score_spreads_ties_uniformly() {
        let p = MaxScorePicker {
            name: "m".into(),
            max_num_of_endpoints: 1,
        };
        let c = counts(&p, &[1.0, 3.0, 3.0, 0.5, 3.0, 3.0], 8000);
        assert_eq!(c[0] + c[3], 0);
        for i in [1, 2, 4, 5] {
            // Expected 2000 each; 5 sigma is about 190.
            assert!((1800..=2200).contains(&c[i]), "{c:?}");
        }
    }

    #[test]
    fn max_score_many_is_sorted_with_random_ties() {
        let p = MaxScorePicker {
            name: "m".into(),
            max_num_of_endpoints: 3,
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut first_of_tie = [0; 2];
        for _ in 0..400 {
            let mut s = scored(&[0.5, 2.0, 1.0, 2.0]);
            assert_eq!(p.pick(&mut s, &mut rng), 3);
            let order: Vec<usize> = s.iter().map(|x| x.index).collect();
            assert!(order[..2] == [1, 3] || order[..2] == [3, 1]);
            assert_eq!(order[2..], [2, 0]);
            first_of_tie[usize::from(order[0] == 3)] += 1;
        }
        assert!(
            first_of_tie[0] > 150 && first_of_tie[1] > 150,
            "{first_of_tie:?}"
        );
    }

    #[test]
    fn random_picker_is_uniform() {
        let p = RandomPicker {
            name: "r".into(),
            max_num_of_endpoints: 1,
        };
        let c = counts(&p, &[0.0, 5.0, 1.0, 0.0], 8000);
        for n in c {
            assert!((1800..=2200).contains(&n), "{n}");
        }
    }

    #[test]
    fn weighted_random_follows_weights() {
        let p = WeightedRandomPicker {
            name: "w".into(),
            max_num_of_endpoints: 1,
        };
        let c = counts(&p, &[1.0, 3.0, 0.0], 8000);
        // P(pick i) = w_i / Σw: 2000 / 6000 / 0.
        assert_eq!(c[2], 0);
        assert!((1800..=2200).contains(&c[0]), "{c:?}");
        assert!((5800..=6200).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn weighted_random_all_zero_is_uniform() {
        let p = WeightedRandomPicker {
            name: "w".into(),
            max_num_of_endpoints: 1,
        };
        let c = counts(&p, &[0.0, 0.0, 0.0, 0.0], 8000);
        for n in c {
            assert!((1800..=2200).contains(&n), "{n}");
        }
    }

    #[test]
    fn pickers_handle_empty_and_small_inputs() {
        let mut rng = StdRng::seed_from_u64(3);
        let pickers: [Box<dyn Picker>; 3] = [
            Box::new(MaxScorePicker {
                name: "m".into(),
                max_num_of_endpoints: 5,
            }),
            Box::new(RandomPicker {
                name: "r".into(),
                max_num_of_endpoints: 5,
            }),
            Box::new(WeightedRandomPicker {
                name: "w".into(),
                max_num_of_endpoints: 5,
            }),
        ];
        for p in &pickers {
            assert_eq!(p.pick(&mut [], &mut rng), 0);
            let mut s = scored(&[0.3, 0.9]);
            assert_eq!(p.pick(&mut s, &mut rng), 2);
            let mut idx: Vec<usize> = s.iter().map(|x| x.index).collect();
            idx.sort();
            assert_eq!(idx, vec![0, 1]);
        }
    }
}
