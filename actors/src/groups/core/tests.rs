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
        instance_id: None,
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
    // As Kafka: a member of the current generation still commits while
    // the group prepares a rebalance (an eager consumer commits what it
    // delivered as it gives its partitions up).
    assert_eq!(core.check_commit("g", 1, &a), Ok(()), "commits while preparing");
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
    let (results, answers) = core.leave("g", &[(a.clone(), None), ("stranger".into(), None)], 10);
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

/// A join of static member `instance` (a restarted one when `member` is
/// empty).
fn static_join(member: &str, instance: &str) -> Join {
    Join {
        instance_id: Some(instance.to_string()),
        // The metadata a restarted member sends again is the same.
        protocols: vec![("range".to_string(), Bytes::from(format!("{instance}:range")))],
        ..join(member, &["range"])
    }
}

/// Two static members in a stable group: (a, b) member ids, generation 1
/// then 2 after b joined; a leads.
fn stable_static_pair(core: &mut GroupsCore) -> (String, String) {
    let answers = core.join(static_join("", "i-a"), 1, 0).expect("a joins");
    let a = joined(&answers, 1).expect("generation 1").member_id;
    core.sync("g", 1, &a, vec![(a.clone(), Bytes::from("all"))], 2, 0)
        .expect("a syncs");
    let answers = core.join(static_join("", "i-b"), 3, 10).expect("b joins");
    assert!(answers.is_empty(), "b waits for a to rejoin");
    let answers = core.join(static_join(&a, "i-a"), 4, 20).expect("a rejoins");
    let b = joined(&answers, 3).expect("generation 2").member_id;
    assert_eq!(joined(&answers, 4).expect("a").generation, 2);
    let assignment = vec![(a.clone(), Bytes::from("p0")), (b.clone(), Bytes::from("p1"))];
    core.sync("g", 2, &b, Vec::new(), 5, 30).expect("b syncs");
    let answers = core.sync("g", 2, &a, assignment, 6, 30).expect("a syncs");
    assert_eq!(synced(&answers, 5).expect("b's share").assignment, Bytes::from("p1"));
    (a, b)
}

/// A static member that restarts (joins again without its member id)
/// takes its place back under a new member id: same generation, same
/// share, no rebalance; the member id it had before is fenced.
#[test]
fn a_restarted_static_member_takes_its_place_back_without_a_rebalance() {
    let mut core = GroupsCore::new(9);
    let (a, b) = stable_static_pair(&mut core);
    let answers = core.join(static_join("", "i-b"), 7, 40).expect("b restarts");
    let back = joined(&answers, 7).expect("answered at once");
    assert_ne!(back.member_id, b, "a new member id");
    assert_eq!(
        (back.generation, back.leader.as_str()),
        (2, a.as_str()),
        "no new generation"
    );
    assert_eq!(core.group("g").map(|g| g.state), Some(GroupState::Stable));
    let answers = core.sync("g", 2, &back.member_id, Vec::new(), 8, 41).expect("syncs");
    assert_eq!(synced(&answers, 8).expect("its share").assignment, Bytes::from("p1"));
    assert_eq!(core.heartbeat("g", 2, &a, 42), Ok(()), "a never noticed");

    assert_eq!(
        core.check_instance("g", Some("i-b"), &b),
        Err(GroupError::FencedInstanceId)
    );
    assert_eq!(core.check_instance("g", Some("i-b"), &back.member_id), Ok(()));
    assert_eq!(
        core.check_instance("g", None, &b),
        Ok(()),
        "a dynamic request is not fenced"
    );
    assert_eq!(core.heartbeat("g", 2, &b, 43), Err(GroupError::UnknownMemberId));
    assert_eq!(
        core.join(static_join(&b, "i-b"), 9, 44),
        Err(GroupError::FencedInstanceId),
        "the old member id cannot rejoin as the instance"
    );
}

/// A restarted static member whose metadata changed, or a group that is
/// not stable, rebalances as a dynamic member would; a static member leaves
/// by instance id (fenced when the member id is another's); one that goes
/// silent is removed after its session timeout.
#[test]
fn static_members_rebalance_when_they_must_and_leave_by_instance_id() {
    let mut core = GroupsCore::new(9);
    let (a, b) = stable_static_pair(&mut core);
    let mut changed = static_join("", "i-b");
    changed.protocols = vec![("range".to_string(), Bytes::from("new topics"))];
    let answers = core.join(changed, 7, 40).expect("b restarts, changed");
    assert!(
        answers.iter().all(|a| !matches!(a, Answer::Join(7, _))),
        "b waits for the rebalance"
    );
    let answers = core.join(static_join(&a, "i-a"), 8, 41).expect("a rejoins");
    let b2 = joined(&answers, 7).expect("generation 3");
    assert_eq!(b2.generation, 3);

    let (results, _) = core.leave("g", &[(b.clone(), Some("i-b".to_string()))], 50);
    assert_eq!(
        results,
        vec![Err(GroupError::FencedInstanceId)],
        "b's old id is not i-b's"
    );
    let (results, answers) = core.leave("g", &[(String::new(), Some("i-b".to_string()))], 51);
    assert_eq!(results, vec![Ok(())]);
    assert!(answers.is_empty());
    assert_eq!(core.group("g").map(|g| g.members.len()), Some(1));
    assert_eq!(
        core.check_instance("g", Some("i-b"), "anyone"),
        Ok(()),
        "i-b is free again"
    );

    // a goes silent: removed after its session timeout (10 s), instance too.
    core.tick(51 + 10_001 + 5_000);
    assert!(core.group("g").is_none_or(|g| g.members.is_empty()));
    let answers = core.join(static_join("", "i-a"), 9, 70_000).expect("a new i-a");
    let fresh = joined(&answers, 9).expect("a fresh group");
    assert_ne!(fresh.member_id, a);
    assert_eq!((fresh.generation, fresh.leader), (1, fresh.member_id.clone()));
}

/// A rebalance that completes while a static member has not rejoined (it
/// may be restarting) keeps it, with its metadata for the leader; when that
/// member led, a member that rejoined leads instead.
#[test]
fn a_static_member_that_misses_a_rebalance_keeps_its_place() {
    let mut core = GroupsCore::new(9);
    let (a, b) = stable_static_pair(&mut core);
    let answers = core.join(join("", &["range"]), 7, 100).expect("c joins");
    assert!(answers.is_empty(), "c waits for the others");
    let answers = core.join(static_join(&b, "i-b"), 8, 110).expect("b rejoins");
    assert!(answers.is_empty(), "a has not rejoined yet");
    // a (the leader) does not rejoin within the rebalance timeout (5 s).
    let answers = core.tick(100 + 5_001);
    let b_joined = joined(&answers, 8).expect("b");
    let c_joined = joined(&answers, 7).expect("c");
    assert_eq!(b_joined.generation, 3);
    assert_ne!(b_joined.leader, a, "a member that rejoined leads");
    let leader = if b_joined.leader == b { &b_joined } else { &c_joined };
    let listed: Vec<&String> = leader.members.iter().map(|(id, _)| id).collect();
    assert!(listed.contains(&&a), "the leader assigns a share to a too: {listed:?}");
    assert_eq!(core.group("g").map(|g| g.members.len()), Some(3));
    assert_eq!(core.check_instance("g", Some("i-a"), &a), Ok(()));
}

/// KIP-394: a join without a member id gets one and no place; the member
/// is admitted when it joins with the id. An id not handed out, or handed
/// out longer ago than the session timeout, is unknown; a client that gave
/// up after the first step leaves no member behind.
#[test]
fn a_member_id_handed_out_admits_its_member_only_when_it_joins_with_it() {
    let mut core = GroupsCore::new(7);
    let given = core.member_id_for(&join("", &["range"]), 0).expect("an id");
    assert!(core.group("g").is_none(), "no member before it joins with the id");
    assert_eq!(
        core.join(join("made-up", &["range"]), 1, 0).map(|_| ()),
        Err(GroupError::UnknownMemberId)
    );
    let answers = core.join(join(&given, &["range"]), 2, 10).expect("joins");
    let first = joined(&answers, 2).expect("generation 1");
    assert_eq!((first.member_id.as_str(), first.members.len()), (given.as_str(), 1));

    let abandoned = core.member_id_for(&join("", &["range"]), 20).expect("an id");
    core.tick(10_021);
    assert_eq!(
        core.join(join(&abandoned, &["range"]), 3, 10_021).map(|_| ()),
        Err(GroupError::UnknownMemberId),
        "expired with its session timeout"
    );
    assert!(!core.group("g").is_some_and(|g| g.members.contains_key(&abandoned)));
    let bad = Join {
        session_timeout_ms: 1,
        ..join("", &["range"])
    };
    assert_eq!(core.member_id_for(&bad, 0), Err(GroupError::InvalidSessionTimeout));
}

/// Ids handed out count against a group's size; over every group they are
/// bounded by forgetting the one soonest to expire, and dropped with the
/// groups a coordinator gives up.
#[test]
fn member_ids_handed_out_and_not_joined_with_are_bounded() {
    let mut core = GroupsCore::new(7);
    let in_group = |g: usize| Join {
        group: format!("g{g}"),
        ..join("", &["range"])
    };
    let oldest = core.member_id_for(&in_group(0), 0).expect("an id");
    for _ in 0..MEMBERS_MAX {
        core.member_id_for(&join("", &["range"]), 1).expect("an id");
    }
    assert_eq!(
        core.member_id_for(&join("", &["range"]), 1),
        Err(GroupError::GroupMaxSizeReached)
    );
    for i in 1..=PENDING_MEMBERS_MAX - MEMBERS_MAX {
        core.member_id_for(&in_group(i), 2).expect("another group has room");
    }
    assert_eq!(core.pending.len(), PENDING_MEMBERS_MAX);
    let rejoin = Join {
        group: "g0".into(),
        ..join(&oldest, &["range"])
    };
    let answers = core.join(rejoin, 1, 3);
    assert_eq!(
        answers.map(|_| ()),
        Err(GroupError::UnknownMemberId),
        "the soonest to expire went"
    );
    core.drop_groups(|g| g == "g");
    assert_eq!(core.pending.len(), PENDING_MEMBERS_MAX - MEMBERS_MAX);
}

/// A client looping on joins with the longest session timeout cannot push
/// out a member that just got its id with a short one.
#[test]
fn a_looping_client_pushes_out_its_own_ids_first() {
    let mut core = GroupsCore::new(7);
    let looping = |i: usize| Join {
        group: format!("flood-{}", i % 20),
        session_timeout_ms: SESSION_TIMEOUT_MAX_MS,
        ..join("", &["range"])
    };
    for i in 0..PENDING_MEMBERS_MAX {
        core.member_id_for(&looping(i), 0).expect("an id");
    }
    let member = core.member_id_for(&join("", &["range"]), 1).expect("an id");
    for i in 0..100 {
        core.member_id_for(&looping(i), 2).expect("an id");
    }
    let answers = core.join(join(&member, &["range"]), 1, 3).expect("admitted");
    assert_eq!(joined(&answers, 1).expect("generation 1").member_id, member);
}
