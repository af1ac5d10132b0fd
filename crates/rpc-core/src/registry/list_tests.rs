use super::*;

fn instance(port: u32) -> Instance {
    Instance {
        host: "10.0.0.1".into(),
        port,
        weight: 100,
        ..Instance::default()
    }
}

fn addrs(list: &ProviderList) -> Vec<&str> {
    list.providers.keys().map(Addr::as_str).collect()
}

fn complete(epoch: &str, revision: u64, ports: &[u32]) -> ProviderList {
    let mut list = ProviderList::default();
    let providers: Vec<Instance> = ports.iter().map(|&p| instance(p)).collect();
    list.apply_snapshot(epoch.into(), revision, false, &providers, true);
    list
}

#[test]
fn a_complete_snapshot_replaces_and_a_partial_one_adds() {
    let mut list = complete("e1", 3, &[1, 2]);
    assert_eq!(addrs(&list), ["10.0.0.1:1", "10.0.0.1:2"]);
    assert_eq!(list.resume_point(), Some(("e1".into(), 3)));

    list.apply_snapshot("e2".into(), 1, true, &[instance(3)], true);
    assert_eq!(addrs(&list), ["10.0.0.1:1", "10.0.0.1:2", "10.0.0.1:3"]);
    assert!(!list.complete);
    assert_eq!(list.resume_point(), None, "a partial list is never resumed");

    list.apply_snapshot("e2".into(), 2, false, &[instance(4)], true);
    assert_eq!(addrs(&list), ["10.0.0.1:4"]);
    assert!(list.complete);
}

#[test]
fn a_delta_applies_only_where_the_list_stands() {
    let list = complete("e1", 5, &[1]);
    assert_eq!(list.step("e1", 5, 6), Step::Apply);
    assert_eq!(list.step("e1", 4, 5), Step::Skip, "already applied");
    assert_eq!(list.step("e1", 6, 7), Step::Behind, "a revision was missed");
    assert_eq!(list.step("e2", 5, 6), Step::Behind, "another server's revisions");
    let waiting = ProviderList::default();
    assert_eq!(waiting.step("e1", 5, 6), Step::Skip, "a snapshot is on its way");
}

#[test]
fn a_kept_list_applies_removals_additions_and_updates() {
    let mut list = complete("e1", 1, &[1, 2, 3]);
    let mut heavier = instance(2);
    heavier.weight = 300;
    let removed = ["10.0.0.1:1"];
    let update = Update::Change {
        added: &[instance(4)],
        updated: std::slice::from_ref(&heavier),
        removed: &removed,
    };
    list.apply_delta(2, &update, true);
    assert_eq!(list.revision, 2);
    assert_eq!(addrs(&list), ["10.0.0.1:2", "10.0.0.1:3", "10.0.0.1:4"]);
    assert_eq!(list.providers["10.0.0.1:2"].weight, 300);
    assert_eq!(list.as_reset().len(), 3);
}

#[test]
fn a_list_not_kept_follows_the_revision_only() {
    let mut list = ProviderList::default();
    list.apply_snapshot("e1".into(), 1, false, &[instance(1)], false);
    assert!(list.providers.is_empty());
    assert_eq!(list.resume_point(), Some(("e1".into(), 1)));
    let update = Update::Change {
        added: &[instance(2)],
        updated: &[],
        removed: &[],
    };
    list.apply_delta(2, &update, false);
    assert!(list.providers.is_empty());
    assert_eq!(list.resume_point(), Some(("e1".into(), 2)));
}
