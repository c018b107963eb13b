//! Which names the forwarder follows upstream: every name a local proxy asked for, up
//! to a limit, until nobody has subscribed to it for `forget_after`. A plain type fed
//! with demand and sweeps, so the rules are tested without a network.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// New: subscribe to it upstream.
    Added,
    /// Already followed.
    Known,
    /// The limit is reached: not followed.
    Refused,
}

pub struct Wanted {
    /// Per name, since when nobody subscribes to it locally (None: someone does, as of
    /// the last sweep).
    names: HashMap<String, Option<Instant>>,
    max: usize,
    forget_after: Duration,
}

impl Wanted {
    pub fn new(max: usize, forget_after: Duration) -> Self {
        Self { names: HashMap::new(), max, forget_after }
    }

    pub fn want(&mut self, name: &str) -> Want {
        if let Some(idle) = self.names.get_mut(name) {
            *idle = None;
            return Want::Known;
        }
        if self.names.len() >= self.max {
            return Want::Refused;
        }
        self.names.insert(name.to_owned(), None);
        Want::Added
    }

    /// Names nobody subscribed to for `forget_after` (given `subscribers`, the local
    /// count per name): forgotten, and returned to be unsubscribed upstream.
    pub fn sweep(&mut self, now: Instant, subscribers: impl Fn(&str) -> usize) -> Vec<String> {
        let mut forget = Vec::new();
        for (name, idle) in &mut self.names {
            if subscribers(name) > 0 {
                *idle = None;
            } else if now.duration_since(*idle.get_or_insert(now)) >= self.forget_after {
                forget.push(name.clone());
            }
        }
        for name in &forget {
            self.names.remove(name);
        }
        forget
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.keys()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn names_are_followed_up_to_the_limit_and_forgotten_when_idle() {
        let mut w = Wanted::new(2, Duration::from_secs(60));
        assert_eq!(w.want("a"), Want::Added);
        assert_eq!(w.want("a"), Want::Known);
        assert_eq!(w.want("b"), Want::Added);
        assert_eq!(w.want("c"), Want::Refused);
        let subscribed = |n: &str| usize::from(n == "a");
        assert!(w.sweep(Instant::now(), subscribed).is_empty(), "b just became idle");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(w.sweep(Instant::now(), subscribed).is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(w.sweep(Instant::now(), subscribed), ["b"]);
        assert_eq!(w.want("c"), Want::Added, "a place was freed");
        // Asked again before the sweep: idle time starts over.
        tokio::time::advance(Duration::from_secs(600)).await;
        w.sweep(Instant::now(), |_| 0);
        assert_eq!(w.want("a"), Want::Known);
        assert_eq!(w.sweep(Instant::now(), |_| 0), Vec::<String>::new(), "a was asked again");
    }
}
