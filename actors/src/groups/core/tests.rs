//! The group state machine: joins, the leader's assignment, rebalances on a
//! new member, a leave and a silent member, and stale generations fenced.

use bytes::Bytes;

use super::*;

fn join(member: &str, protocols: &[&str]) -> Join {
    Join {
        group: "g".into(),
        member_id: member.into(),
        client_id: "client".into(),
        client_host: "/127.0.0.1".into(),
        protocol_type: "consumer".into(),
        protocols: protocols
            .iter()
            .map(|p| (p.to_string(), Bytes::from(format!("{member}:{p}"))))
            .collect(),
        session_timeout_ms: 10_000,
        rebalance_timeout_ms: 5_000,
    }
}

fn joined(answers: &[Answer], ticket: Ticket) -> Result<Joined, GroupError> {
    answers
        .iter()
        .find_map(|a| match a {
            Answer::Join(t, r) if *t == ticket => Some(r.clone()),
            _ => None,
        })
        .expect("the join is answered")
}

fn synced(answers: &[Answer], ticket: Ticket) -> Result<Synced, GroupError> {
    answers
        .iter()
        .find_map(|a| match a {
            Answer::Sync(t, r) if *t == ticket => Some(r.clone()),
            _ => None,
        })
        .expect("the sync is answered")
}

/// One member joins, syncs its own assignment; returns its id.
fn first_member(core: &mut GroupsCore) -> String {
    let answers = core.join(join("", &["range"]), 1, 0).expect("joins");
    let first = joined(&answers, 1).expect("generation 1");
    assert_eq!((first.generation, first.leader.as_str()), (1, first.member_id.as_str()));
    assert_eq!(first.members.len(), 1, "the leader sees the members");
    let id = first.member_id;
    let answers = core
        .sync("g", 1, &id, vec![(id.clone(), Bytes::from("p0,p1"))], 2, 0)
        .expect("syncs");
    assert_eq!(synced(&answers, 2).expect("stable").assignment, Bytes::from("p0,p1"));
    id
}

#[test]
fn a_second_member_rebalances_the_group_and_each_gets_the_leaders_assignment() {
    let mut core = GroupsCore::new(9);
    let a = first_member(&mut core);
    let answers = core.join(join("", &["roundrobin", "range"]), 3, 100).expect("parked");
    assert!(answers.is_empty(), "waits for the known member to rejoin");
    assert_eq!(core.heartbeat("g", 1, &a, 150), Err(GroupError::RebalanceInProgress));
    let answers = core.join(join(&a, &["range"]), 4, 200).expect("rejoins");
    let leader = joined(&answers, 4).expect("generation 2");
    let b = joined(&answers, 3).expect("generation 2").member_id;
    assert_eq!(
        (leader.generation, leader.protocol.as_str()),
        (2, "range"),
        "the protocol both offer"
    );
    assert_eq!(leader.members.len(), 2);
    assert!(leader
        .members
        .iter()
        .any(|(id, meta)| *id == b && meta == &Bytes::from_static(b":range")));

    assert!(core.sync("g", 2, &b, Vec::new(), 5, 250).expect("parked").is_empty());
    let assignment = vec![(a.clone(), Bytes::from("p0")), (b.clone(), Bytes::from("p1"))];
    let answers = core.sync("g", 2, &a, assignment, 6, 300).expect("the leader's");
    assert_eq!(synced(&answers, 5).expect("b").assignment, Bytes::from("p1"));
    assert_eq!(synced(&answers, 6).expect("a").assignment, Bytes::from("p0"));
    assert_eq!(core.heartbeat("g", 2, &b, 350), Ok(()));
    assert_eq!(
        core.heartbeat("g", 1, &b, 350),
        Err(GroupError::IllegalGeneration),
        "stale generation"
    );
    assert_eq!(core.check_commit("g", 1, &a), Err(GroupError::IllegalGeneration));
    assert_eq!(core.check_commit("g", 2, &a), Ok(()));
    assert_eq!(
        core.check_commit("g", -1, ""),
        Err(GroupError::RebalanceInProgress),
        "members own the group"
    );
}

#[test]
fn a_silent_member_is_removed_after_its_session_timeout_and_the_rest_rebalance() {
    let mut core = GroupsCore::new(9);
    let a = first_member(&mut core);
    core.join(join("", &["range"]), 3, 0).expect("parked");
    let answers = core.join(join(&a, &["range"]), 4, 0).expect("rejoins");
    let b = joined(&answers, 3).expect("b").member_id;
    core.sync("g", 2, &a, Vec::new(), 5, 0).expect("stable");
    for now in (1_000..9_000).step_by(1_000) {
        assert_eq!(core.heartbeat("g", 2, &a, now), Ok(()));
        assert!(core.tick(now).is_empty());
    }
    core.tick(10_001);
    assert_eq!(
        core.heartbeat("g", 2, &b, 10_002),
        Err(GroupError::UnknownMemberId),
        "b expired"
    );
    assert_eq!(core.heartbeat("g", 2, &a, 10_002), Err(GroupError::RebalanceInProgress));
    let answers = core.join(join(&a, &["range"]), 6, 10_003).expect("rejoins");
    assert_eq!(joined(&answers, 6).expect("alone").generation, 3);
}

#[test]
fn a_member_that_does_not_rejoin_in_the_rebalance_timeout_is_dropped() {
    let mut core = GroupsCore::new(9);
    let a = first_member(&mut core);
    assert!(core.join(join("", &["range"]), 3, 1_000).expect("parked").is_empty());
    assert!(
        core.tick(5_999).is_empty(),
        "the rebalance timeout (5 s) has not passed"
    );
    let answers = core.tick(6_001);
    let b = joined(&answers, 3).expect("completed without a");
    assert_eq!((b.generation, b.members.len()), (2, 1));
    assert_eq!(core.heartbeat("g", 2, &a, 6_002), Err(GroupError::UnknownMemberId));
}

#[test]
fn a_leave_rebalances_the_rest_and_the_last_leave_empties_the_group() {
    let mut core = GroupsCore::new(9);
    let a = first_member(&mut core);
    let (results, answers) = core.leave("g", &[a.clone(), "stranger".into()], 10);
    assert_eq!(results, vec![Ok(()), Err(GroupError::UnknownMemberId)]);
    assert!(answers.is_empty());
    assert_eq!(core.group("g").map(|g| g.state), Some(GroupState::Empty));
    assert_eq!(
        core.check_commit("g", -1, ""),
        Ok(()),
        "an empty group takes commits from outside"
    );
}

#[test]
fn bad_joins_are_refused_by_name() {
    let mut core = GroupsCore::new(9);
    first_member(&mut core);
    let mut short = join("", &["range"]);
    short.session_timeout_ms = 10;
    assert_eq!(core.join(short, 3, 0), Err(GroupError::InvalidSessionTimeout));
    assert_eq!(
        core.join(join("", &["cooperative"]), 4, 0),
        Err(GroupError::InconsistentGroupProtocol)
    );
    assert_eq!(
        core.join(join("ghost", &["range"]), 5, 0),
        Err(GroupError::UnknownMemberId)
    );
    let answers = core.drop_groups(|_| true);
    assert!(answers.is_empty() && core.group("g").is_none());
}
