use super::socket::group_id;
use super::*;

fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
    Caller {
        uid: Some(uid),
        gid: Some(gid),
        pid: Some(1),
        groups: groups.to_vec(),
    }
}

#[test]
fn only_root_the_agent_and_the_group_may_call() {
    let policy = Policy {
        own_uid: 990,
        group: Some(4242),
    };
    assert!(policy.allows(&caller(0, 0, &[])));
    assert!(policy.allows(&caller(990, 990, &[])));
    assert!(policy.allows(&caller(1000, 4242, &[])));
    assert!(policy.allows(&caller(1000, 1000, &[27, 4242])));
    assert!(!policy.allows(&caller(1000, 1000, &[27])));
    assert!(!policy.allows(&Caller::default()));
    let no_group = Policy {
        own_uid: 990,
        group: None,
    };
    assert!(!no_group.allows(&caller(1000, 4242, &[4242])));
}

#[test]
fn groups_resolve_by_name_and_number() {
    assert_eq!(group_id("root"), Ok(0));
    assert_eq!(group_id("4242"), Ok(4242));
    let e = group_id("jumpgate-no-such-group").unwrap_err();
    assert!(e.contains("groupadd"), "{e}");
}

#[test]
fn requests_hide_their_token() {
    let r: AddRequest =
        serde_json::from_str(r#"{"name":"vh-1","services":["ssh=127.0.0.1:22"],"token":"s3cret"}"#)
            .unwrap();
    assert!(!format!("{r:?}").contains("s3cret"));
}
