use super::*;

fn key() -> ServiceKey {
    ServiceKey::new("demo.Greeter", "1.0.0", "")
}

fn list() -> ProviderList {
    let instance = Instance {
        host: "10.0.0.1".into(),
        port: 20880,
        weight: 100,
        ..Instance::default()
    };
    ProviderList {
        epoch: "e1".into(),
        revision: 7,
        providers: [(instance_addr(&instance), Arc::new(instance))].into(),
        complete: true,
    }
}

fn rules() -> RuleSet {
    let json = r#"{"w":{"kind":"weight","overrides":[{"address":"10.0.0.1:20880","weight":5}]}}"#;
    parse_rules(3, json).unwrap()
}

#[test]
fn lists_and_rules_come_back_as_they_were_written() {
    let (key, list, rules) = (key(), list(), rules());
    assert_eq!(rules.rules.len(), 1);
    let bytes = encode([(&key, &list)].into_iter(), [(&key, &rules)].into_iter());
    let cached = decode(&bytes).unwrap();
    assert_eq!(cached.lists[&key], list);
    assert_eq!(cached.rules[&key], rules);
}

#[test]
fn a_partial_list_stays_partial() {
    let (key, mut list) = (key(), list());
    list.complete = false;
    let cached = decode(&encode([(&key, &list)].into_iter(), std::iter::empty())).unwrap();
    assert!(!cached.lists[&key].complete);
    assert_eq!(cached.lists[&key].resume_point(), None);
}

#[test]
fn a_rule_of_an_unknown_kind_is_skipped_and_the_rest_kept() {
    let json = r#"{"w":{"kind":"weight","overrides":[]},"x":{"kind":"from_a_newer_server"}}"#;
    let set = parse_rules(4, json).unwrap();
    assert_eq!(set.rules.keys().collect::<Vec<_>>(), ["w"]);
}

#[tokio::test]
async fn a_saved_file_loads_and_a_missing_or_corrupt_one_is_empty() {
    let dir = std::env::temp_dir().join(format!("tern-cache-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("providers.cache");
    let _ = std::fs::remove_file(&path);
    assert_eq!(load(&path), Cached::default(), "no file yet");

    let (key, list) = (key(), list());
    save(&path, encode([(&key, &list)].into_iter(), std::iter::empty())).await;
    assert_eq!(load(&path).lists[&key], list);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("providers.cache")],
        "a temporary file was left"
    );
    // It holds service tokens: its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "cache file mode {mode:o}");

    // Two savers of one path (two processes sharing a cache file) never
    // write into each other's temporary file: every save lands whole.
    let savers: Vec<_> = (0..8)
        .map(|_| {
            let (path, bytes) = (path.clone(), encode([(&key, &list)].into_iter(), std::iter::empty()));
            tokio::spawn(async move { save(&path, bytes).await })
        })
        .collect();
    for saver in savers {
        saver.await.unwrap();
    }
    assert_eq!(load(&path).lists[&key], list);

    std::fs::write(&path, b"\xff\xff\xff not a cache").unwrap();
    assert_eq!(load(&path), Cached::default(), "a corrupt file is ignored");
    std::fs::remove_dir_all(&dir).unwrap();
}
