use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;

fn reconnect() -> Reconnect {
    let backoff = Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_millis(800),
    };
    Reconnect::new(vec!["a:1".into(), "b:2".into()], backoff)
}

fn refused() -> StreamError {
    StreamError::Refused {
        kind: "unauthenticated".into(),
        message: "bad token for app web".into(),
    }
}

fn unreachable() -> StreamError {
    StreamError::Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into())
}

#[test]
fn servers_are_tried_in_turn() {
    let mut r = reconnect();
    let tried: Vec<String> = (0..5).map(|_| r.next_server().unwrap()).collect();
    assert_eq!(tried, ["a:1", "b:2", "a:1", "b:2", "a:1"]);
    assert_eq!(Reconnect::new(Vec::new(), Backoff::default()).next_server(), None);
}

#[test]
fn failures_in_a_row_back_off_further_up_to_the_maximum() {
    let (mut r, mut rng) = (reconnect(), SmallRng::seed_from_u64(7));
    let ceilings = [100, 200, 400, 800, 800, 800];
    for (n, ceiling) in ceilings.into_iter().enumerate() {
        let (_, delay) = r.after(&Attempt::Failed(unreachable()), &mut rng);
        assert_eq!(r.failures(), n as u32 + 1);
        let ceiling = Duration::from_millis(ceiling);
        assert!(
            delay >= ceiling / 2 && delay <= ceiling,
            "failure {n}: {delay:?} not within [{:?}, {ceiling:?}]",
            ceiling / 2
        );
    }
}

#[test]
fn an_established_stream_that_ends_resets_the_backoff() {
    let (mut r, mut rng) = (reconnect(), SmallRng::seed_from_u64(7));
    for _ in 0..4 {
        r.after(&Attempt::Failed(unreachable()), &mut rng);
    }
    let (say, delay) = r.after(&Attempt::Ended(StreamError::Closed), &mut rng);
    assert_eq!((say, r.failures()), (Say::Warn, 0));
    assert!(
        delay <= Duration::from_millis(100),
        "quick retry after a lost session: {delay:?}"
    );
}

#[test]
fn how_loudly_each_failure_is_said() {
    let (mut r, mut rng) = (reconnect(), SmallRng::seed_from_u64(7));
    assert_eq!(r.after(&Attempt::Failed(refused()), &mut rng).0, Say::Warn);
    assert_eq!(
        r.after(&Attempt::Failed(refused()), &mut rng).0,
        Say::Warn,
        "a refusal every time"
    );
    let mut r = reconnect();
    assert_eq!(
        r.after(&Attempt::Failed(unreachable()), &mut rng).0,
        Say::Debug,
        "an unreachable server quietly"
    );
    // A server that answers but opens no session: at the 1st, 2nd, 4th, 8th... in a row.
    let mut r = reconnect();
    let mut said = Vec::new();
    for _ in 1..=9 {
        if r.after(&Attempt::Failed(StreamError::ClosedBeforeWelcome), &mut rng).0 == Say::Warn {
            said.push(r.failures());
        }
    }
    assert_eq!(said, [1, 2, 4, 8]);
}
