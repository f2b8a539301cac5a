use super::*;

const I1: &str = "iqn.2005-03.org.open-iscsi:one";
const I2: &str = "iqn.2005-03.org.open-iscsi:two";
const I3: &str = "iqn.2005-03.org.open-iscsi:three";

fn nx(name: &str, isid_last: u8) -> Arc<Nexus> {
    Arc::new(Nexus {
        initiator_name: Arc::from(name),
        isid: [0x80, 0, 0, 0, 0, isid_last],
        target_name: Arc::from("iqn.2024-01.io.ironblock:vol"),
        tpgt: 1,
    })
}

fn prout_cdb(action: u8, scope: u8, ptype: u8, len: u32) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = 0x5f;
    c[1] = action;
    c[2] = (scope << 4) | ptype;
    c[5..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn basic(rk: u64, sark: u64, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&rk.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    p[20] = flags;
    p
}

fn prout(
    r: &mut Reservations,
    n: &Arc<Nexus>,
    action: u8,
    ptype: u8,
    rk: u64,
    sark: u64,
) -> Result<PrEffects, Option<Sense>> {
    r.persistent_reserve_out(n, &prout_cdb(action, 0, ptype, 24), &basic(rk, sark, 0))
}

fn ok(res: Result<PrEffects, Option<Sense>>) -> PrEffects {
    match res {
        Ok(e) => e,
        Err(e) => panic!("expected GOOD, got {e:?}"),
    }
}

fn register(r: &mut Reservations, n: &Arc<Nexus>, key: u64) {
    ok(prout(r, n, sa::REGISTER_AND_IGNORE, 0, 0, key));
}

fn prin(r: &Reservations, n: &Nexus, action: u8) -> Result<Vec<u8>, Sense> {
    let mut c = vec![0u8; 10];
    c[0] = 0x5e;
    c[1] = action;
    c[7] = 0xff;
    c[8] = 0xff;
    r.persistent_reserve_in(n, &c)
}

fn keys(r: &Reservations) -> (u32, Vec<u64>) {
    let d = prin(r, &nx(I1, 1), 0).unwrap();
    let gen = u32::from_be_bytes(d[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(len, d.len() - 8);
    let ks = d[8..]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    (gen, ks)
}

/// (key, type) of the reservation, or None.
fn reservation(r: &Reservations) -> Option<(u64, u8)> {
    let d = prin(r, &nx(I1, 1), 1).unwrap();
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap());
    if len == 0 {
        assert_eq!(d.len(), 8);
        return None;
    }
    assert_eq!(len, 16);
    assert_eq!(d.len(), 24);
    Some((u64::from_be_bytes(d[8..16].try_into().unwrap()), d[21]))
}

const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0];
const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0];
const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 36, 0];
const TUR: [u8; 6] = [0; 6];
const MODE_SENSE6: [u8; 6] = [0x1a, 0, 0x3f, 0, 255, 0];
const READ_CAP10: [u8; 10] = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const REPORT_LUNS: [u8; 12] = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
const REQUEST_SENSE: [u8; 6] = [0x03, 0, 0, 0, 18, 0];
const RESERVE6: [u8; 6] = [0x16, 0, 0, 0, 0, 0];
const RELEASE6: [u8; 6] = [0x17, 0, 0, 0, 0, 0];
const SYNC_CACHE10: [u8; 10] = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const READ_CAP16: [u8; 16] = [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
const PRIN_READ_KEYS: [u8; 10] = [0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0];

// ---- PERSISTENT RESERVE IN ----

#[test]
fn read_keys_empty_and_populated() {
    let mut r = Reservations::new();
    let (gen, ks) = keys(&r);
    assert_eq!(gen, 0);
    assert!(ks.is_empty());
    register(&mut r, &nx(I1, 1), 0x1111);
    register(&mut r, &nx(I2, 1), 0x2222);
    let (gen, ks) = keys(&r);
    assert_eq!(gen, 2);
    assert_eq!(ks, vec![0x1111, 0x2222]);
}

#[test]
fn prin_service_action_range() {
    let r = Reservations::new();
    for s in 0..4 {
        assert!(prin(&r, &nx(I1, 1), s).is_ok(), "SA {s}");
    }
    for s in 4..0x20 {
        assert_eq!(prin(&r, &nx(I1, 1), s), Err(INVALID_FIELD_IN_CDB), "SA {s}");
    }
}

#[test]
fn read_reservation_reports_key_and_type() {
    let mut r = Reservations::new();
    assert_eq!(reservation(&r), None);
    let a = nx(I1, 1);
    register(&mut r, &a, 0xabc);
    ok(prout(
        &mut r,
        &a,
        sa::RESERVE,
        pr_type::EXCLUSIVE_ACCESS,
        0xabc,
        0,
    ));
    assert_eq!(reservation(&r), Some((0xabc, pr_type::EXCLUSIVE_ACCESS)));
}

#[test]
fn read_reservation_all_registrants_key_is_zero() {
    for t in [7u8, 8] {
        let mut r = Reservations::new();
        let a = nx(I1, 1);
        register(&mut r, &a, 0xabc);
        ok(prout(&mut r, &a, sa::RESERVE, t, 0xabc, 0));
        assert_eq!(reservation(&r), Some((0, t)));
    }
}

#[test]
fn report_capabilities() {
    let r = Reservations::new();
    let d = prin(&r, &nx(I1, 1), 2).unwrap();
    assert_eq!(d.len(), 8);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), 8);
    assert_eq!(d[2], 0, "CRH, SIP_C, ATP_C, PTPL_C all zero");
    assert_eq!(d[3] & 0x80, 0x80, "TMV");
    assert!((d[3] >> 4) & 7 <= 5, "ALLOW COMMANDS");
    assert_eq!(d[3] & 1, 0, "PTPL_A");
    // All six types.
    assert_eq!(d[4], 0xea);
    assert_eq!(d[5], 0x01);
}

#[test]
fn read_full_status() {
    let mut r = Reservations::new();
    let a = nx(I1, 0x3d);
    let b = nx(I2, 2);
    register(&mut r, &a, 0x10);
    register(&mut r, &b, 0x20);
    ok(prout(
        &mut r,
        &a,
        sa::RESERVE,
        pr_type::WRITE_EXCLUSIVE,
        0x10,
        0,
    ));
    let d = prin(&r, &a, 3).unwrap();
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 2);
    let add = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(add, d.len() - 8);
    // First descriptor: holder a.
    let desc = &d[8..];
    assert_eq!(u64::from_be_bytes(desc[0..8].try_into().unwrap()), 0x10);
    assert_eq!(desc[12], 0x01, "R_HOLDER");
    assert_eq!(desc[13], pr_type::WRITE_EXCLUSIVE);
    assert_eq!(u16::from_be_bytes([desc[18], desc[19]]), 1);
    let tid_len = u32::from_be_bytes(desc[20..24].try_into().unwrap()) as usize;
    let tid = &desc[24..24 + tid_len];
    assert_eq!(tid[0], 0x45, "format 01b, iSCSI");
    let name_len = u16::from_be_bytes([tid[2], tid[3]]) as usize;
    assert_eq!(name_len % 4, 0);
    assert!(name_len >= 20);
    assert_eq!(4 + name_len, tid_len);
    let expected = format!("{I1},i,0x80000000003d");
    assert_eq!(&tid[4..4 + expected.len()], expected.as_bytes());
    assert_eq!(tid[4 + expected.len()], 0);
    // Second descriptor: registrant b, not holder.
    let desc2 = &desc[24 + tid_len..];
    assert_eq!(u64::from_be_bytes(desc2[0..8].try_into().unwrap()), 0x20);
    assert_eq!(desc2[12], 0);
    assert_eq!(desc2[13], 0);
    // Round trip through the parser.
    assert_eq!(
        parse_iscsi_transport_id(tid),
        Some((I1.to_string(), [0x80, 0, 0, 0, 0, 0x3d]))
    );
}

// ---- REGISTER / REGISTER AND IGNORE EXISTING KEY ----

#[test]
fn register_flow_like_libiscsi() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    register(&mut r, &a, 0x42);
    assert_eq!(keys(&r).1, vec![0x42]);
    // Re-register with RK=0 while registered: conflict.
    assert!(matches!(
        prout(&mut r, &a, sa::REGISTER, 0, 0, 0x43),
        Err(None)
    ));
    // Unregister with the right key.
    ok(prout(&mut r, &a, sa::REGISTER, 0, 0x42, 0));
    assert!(keys(&r).1.is_empty());
}

#[test]
fn register_requires_zero_key_when_unregistered() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    assert!(matches!(
        prout(&mut r, &a, sa::REGISTER, 0, 5, 6),
        Err(None)
    ));
    ok(prout(&mut r, &a, sa::REGISTER, 0, 0, 6));
    assert_eq!(keys(&r), (1, vec![6]));
    // Change key with the right reservation key.
    ok(prout(&mut r, &a, sa::REGISTER, 0, 6, 7));
    assert_eq!(keys(&r), (2, vec![7]));
}

#[test]
fn unregister_of_unregistered_is_noop() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    ok(prout(&mut r, &a, sa::REGISTER, 0, 0, 0));
    ok(prout(&mut r, &a, sa::REGISTER_AND_IGNORE, 0, 0, 0));
    assert_eq!(keys(&r), (0, vec![]));
}

#[test]
fn register_and_ignore_replaces_key() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    register(&mut r, &a, 1);
    ok(prout(&mut r, &a, sa::REGISTER_AND_IGNORE, 0, 999, 2));
    assert_eq!(keys(&r).1, vec![2]);
}

#[test]
fn registrations_are_per_nexus() {
    let mut r = Reservations::new();
    // Same initiator name, different ISID: two I_T nexuses.
    register(&mut r, &nx(I1, 1), 1);
    register(&mut r, &nx(I1, 2), 2);
    assert_eq!(keys(&r).1, vec![1, 2]);
    // Same keys may be shared by several nexuses.
    register(&mut r, &nx(I2, 1), 1);
    assert_eq!(keys(&r).1, vec![1, 2, 1]);
}

#[test]
fn prout_parameter_checks() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    for len in [0u32, 23, 25, 32] {
        let res = r.persistent_reserve_out(
            &a,
            &prout_cdb(sa::REGISTER, 0, 0, len),
            &vec![0u8; len as usize],
        );
        assert_eq!(res.err(), Some(Some(PARAM_LIST_LENGTH_ERROR)), "len {len}");
    }
    // CDB says 24 but less data arrived.
    let res = r.persistent_reserve_out(&a, &prout_cdb(sa::REGISTER, 0, 0, 24), &[0u8; 10]);
    assert_eq!(res.err(), Some(Some(PARAM_LIST_LENGTH_ERROR)));
    // SPEC_I_PT, ALL_TG_PT and APTPL are unsupported on REGISTER.
    for flags in [0x08u8, 0x04, 0x01] {
        let res =
            r.persistent_reserve_out(&a, &prout_cdb(sa::REGISTER, 0, 0, 24), &basic(0, 1, flags));
        assert_eq!(
            res.err(),
            Some(Some(INVALID_FIELD_IN_PARAM)),
            "flags {flags:#x}"
        );
    }
    assert!(keys(&r).1.is_empty());
    // Unknown service action.
    let res = r.persistent_reserve_out(&a, &prout_cdb(0x08, 0, 0, 24), &basic(0, 1, 0));
    assert_eq!(res.err(), Some(Some(INVALID_FIELD_IN_CDB)));
    register(&mut r, &a, 1);
    // Invalid types and scopes.
    for t in [0u8, 2, 4, 9, 15] {
        let res = prout(&mut r, &a, sa::RESERVE, t, 1, 0);
        assert_eq!(res.err(), Some(Some(INVALID_FIELD_IN_CDB)), "type {t}");
    }
    let res = r.persistent_reserve_out(&a, &prout_cdb(sa::RESERVE, 1, 1, 24), &basic(1, 0, 0));
    assert_eq!(res.err(), Some(Some(INVALID_FIELD_IN_CDB)));
    // ALL_TG_PT / APTPL are ignored outside REGISTER.
    ok(r.persistent_reserve_out(&a, &prout_cdb(sa::RESERVE, 0, 1, 24), &basic(1, 0, 0x05)));
    // Truncated CDB does not panic.
    assert!(r.persistent_reserve_out(&a, &[0x5f], &[]).is_err());
    assert!(r.persistent_reserve_in(&a, &[]).is_ok());
}

// ---- RESERVE / RELEASE ----

#[test]
fn reserve_requires_registration_and_key() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    assert!(matches!(prout(&mut r, &a, sa::RESERVE, 1, 0, 0), Err(None)));
    register(&mut r, &a, 5);
    assert!(matches!(prout(&mut r, &a, sa::RESERVE, 1, 6, 0), Err(None)));
    let gen = keys(&r).0;
    ok(prout(&mut r, &a, sa::RESERVE, 1, 5, 0));
    // Reserve again with the same type: GOOD; another type: conflict.
    ok(prout(&mut r, &a, sa::RESERVE, 1, 5, 0));
    assert!(matches!(prout(&mut r, &a, sa::RESERVE, 3, 5, 0), Err(None)));
    assert_eq!(keys(&r).0, gen, "RESERVE does not bump PRgeneration");
    // Another registrant cannot reserve.
    let b = nx(I2, 1);
    register(&mut r, &b, 6);
    assert!(matches!(prout(&mut r, &b, sa::RESERVE, 1, 6, 0), Err(None)));
}

#[test]
fn all_registrants_reserve_by_other_registrant() {
    for t in [7u8, 8] {
        let mut r = Reservations::new();
        let (a, b) = (nx(I1, 1), nx(I2, 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 2);
        ok(prout(&mut r, &a, sa::RESERVE, t, 1, 0));
        ok(prout(&mut r, &b, sa::RESERVE, t, 2, 0));
        assert!(matches!(prout(&mut r, &b, sa::RESERVE, 1, 2, 0), Err(None)));
    }
}

#[test]
fn release_rules_and_unit_attentions() {
    for t in [1u8, 3, 5, 6, 7, 8] {
        let mut r = Reservations::new();
        let (a, b, c) = (nx(I1, 1), nx(I2, 1), nx(I3, 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 2);
        ok(prout(&mut r, &a, sa::RESERVE, t, 1, 0));
        // Unregistered: conflict; wrong key: conflict.
        assert!(matches!(prout(&mut r, &c, sa::RELEASE, t, 0, 0), Err(None)));
        assert!(matches!(prout(&mut r, &a, sa::RELEASE, t, 9, 0), Err(None)));
        if !is_all_registrants(t) {
            // Registered non-holder: GOOD, nothing happens.
            ok(prout(&mut r, &b, sa::RELEASE, t, 2, 0));
            assert!(reservation(&r).is_some());
        }
        // Wrong type from the holder: INVALID RELEASE OF PERSISTENT RESERVATION.
        let wrong = if t == 1 { 3 } else { 1 };
        assert_eq!(
            prout(&mut r, &a, sa::RELEASE, wrong, 1, 0).err(),
            Some(Some(INVALID_RELEASE))
        );
        let gen = keys(&r).0;
        let eff = ok(prout(&mut r, &a, sa::RELEASE, t, 1, 0));
        assert_eq!(reservation(&r), None);
        assert_eq!(keys(&r).0, gen, "RELEASE does not bump PRgeneration");
        assert_eq!(keys(&r).1, vec![1, 2], "registrations stay");
        if t == 1 || t == 3 {
            assert!(eff.unit_attentions.is_empty(), "type {t}");
        } else {
            assert_eq!(eff.unit_attentions.len(), 1, "type {t}");
            assert_eq!(*eff.unit_attentions[0].0, *b);
            assert_eq!(eff.unit_attentions[0].1, UA_RESERVATIONS_RELEASED);
        }
        // Releasing when nothing is reserved: GOOD.
        ok(prout(&mut r, &a, sa::RELEASE, t, 1, 0));
    }
}

// ---- CLEAR ----

#[test]
fn clear_removes_everything() {
    let mut r = Reservations::new();
    let (a, b, c) = (nx(I1, 1), nx(I2, 1), nx(I3, 1));
    register(&mut r, &a, 1);
    register(&mut r, &b, 2);
    ok(prout(&mut r, &a, sa::RESERVE, 3, 1, 0));
    assert!(matches!(prout(&mut r, &c, sa::CLEAR, 0, 0, 0), Err(None)));
    assert!(matches!(prout(&mut r, &b, sa::CLEAR, 0, 7, 0), Err(None)));
    let gen = keys(&r).0;
    let eff = ok(prout(&mut r, &b, sa::CLEAR, 0, 2, 0));
    assert_eq!(keys(&r), (gen + 1, vec![]));
    assert_eq!(reservation(&r), None);
    assert_eq!(eff.unit_attentions.len(), 1);
    assert_eq!(*eff.unit_attentions[0].0, *a);
    assert_eq!(eff.unit_attentions[0].1, UA_RESERVATIONS_PREEMPTED);
}

#[test]
fn clear_simple_like_libiscsi() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    register(&mut r, &a, 7);
    let old = keys(&r).0;
    ok(prout(&mut r, &a, sa::RESERVE, 3, 7, 0));
    assert_eq!(reservation(&r), Some((7, 3)));
    ok(prout(&mut r, &a, sa::CLEAR, 0, 7, 0));
    assert_eq!(reservation(&r), None);
    assert_eq!(keys(&r), (old + 1, vec![]));
}

// ---- PREEMPT / PREEMPT AND ABORT ----

#[test]
fn preempt_registration_without_reservation_like_libiscsi() {
    for action in [sa::PREEMPT, sa::PREEMPT_AND_ABORT] {
        let mut r = Reservations::new();
        let (a, b) = (nx(I1, 1), nx(I1, 2));
        register(&mut r, &a, 0x11);
        register(&mut r, &b, 0x22);
        let old = keys(&r).0;
        let eff = ok(prout(&mut r, &b, action, 3, 0x22, 0x11));
        assert_eq!(keys(&r), (old + 1, vec![0x22]));
        assert_eq!(reservation(&r), None, "no reservation is created");
        assert_eq!(eff.unit_attentions.len(), 1);
        assert_eq!(*eff.unit_attentions[0].0, *a);
        assert_eq!(eff.unit_attentions[0].1, UA_REGISTRATIONS_PREEMPTED);
    }
}

#[test]
fn preempt_errors() {
    let mut r = Reservations::new();
    let (a, b, c) = (nx(I1, 1), nx(I2, 1), nx(I3, 1));
    register(&mut r, &a, 1);
    register(&mut r, &b, 2);
    // Not registered / wrong key.
    assert!(matches!(prout(&mut r, &c, sa::PREEMPT, 1, 0, 1), Err(None)));
    assert!(matches!(prout(&mut r, &b, sa::PREEMPT, 1, 3, 1), Err(None)));
    // SARK zero without an all-registrants reservation.
    assert_eq!(
        prout(&mut r, &b, sa::PREEMPT, 1, 2, 0).err(),
        Some(Some(INVALID_FIELD_IN_PARAM))
    );
    // SARK naming nobody.
    assert!(matches!(
        prout(&mut r, &b, sa::PREEMPT, 1, 2, 77),
        Err(None)
    ));
    let gen = keys(&r).0;
    // Failed commands do not bump the generation.
    assert_eq!(gen, 2);
    // With an ordinary reservation held by a: SARK 0 still invalid.
    ok(prout(&mut r, &a, sa::RESERVE, 1, 1, 0));
    assert_eq!(
        prout(&mut r, &b, sa::PREEMPT, 1, 2, 0).err(),
        Some(Some(INVALID_FIELD_IN_PARAM))
    );
}

#[test]
fn preempt_reservation_holder() {
    let mut r = Reservations::new();
    let (a, b, c) = (nx(I1, 1), nx(I2, 1), nx(I3, 1));
    register(&mut r, &a, 1);
    register(&mut r, &b, 2);
    register(&mut r, &c, 3);
    ok(prout(
        &mut r,
        &a,
        sa::RESERVE,
        pr_type::WRITE_EXCLUSIVE,
        1,
        0,
    ));
    // b preempts a, changing the type to Exclusive Access.
    let eff = ok(prout(
        &mut r,
        &b,
        sa::PREEMPT,
        pr_type::EXCLUSIVE_ACCESS,
        2,
        1,
    ));
    assert_eq!(reservation(&r), Some((2, pr_type::EXCLUSIVE_ACCESS)));
    assert_eq!(keys(&r).1, vec![2, 3]);
    let uas: Vec<(Nexus, Sense)> = eff
        .unit_attentions
        .iter()
        .map(|(n, s)| ((**n).clone(), *s))
        .collect();
    assert!(uas.contains(&((*a).clone(), UA_REGISTRATIONS_PREEMPTED)));
    assert!(uas.contains(&((*c).clone(), UA_RESERVATIONS_RELEASED)));
    assert_eq!(uas.len(), 2);
    // Same type: no RESERVATIONS RELEASED.
    let eff = ok(prout(
        &mut r,
        &c,
        sa::PREEMPT,
        pr_type::EXCLUSIVE_ACCESS,
        3,
        2,
    ));
    assert_eq!(reservation(&r), Some((3, pr_type::EXCLUSIVE_ACCESS)));
    assert_eq!(eff.unit_attentions.len(), 1);
    assert_eq!(*eff.unit_attentions[0].0, *b);
    assert_eq!(eff.unit_attentions[0].1, UA_REGISTRATIONS_PREEMPTED);
}

#[test]
fn preempt_own_reservation_changes_type() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    register(&mut r, &a, 1);
    ok(prout(&mut r, &a, sa::RESERVE, 1, 1, 0));
    let eff = ok(prout(&mut r, &a, sa::PREEMPT, 3, 1, 1));
    assert!(eff.unit_attentions.is_empty());
    assert_eq!(reservation(&r), Some((1, 3)));
    assert_eq!(keys(&r).1, vec![1]);
}

#[test]
fn preempt_non_holder_leaves_reservation() {
    let mut r = Reservations::new();
    let (a, b, c) = (nx(I1, 1), nx(I2, 1), nx(I3, 1));
    register(&mut r, &a, 1);
    register(&mut r, &b, 2);
    register(&mut r, &c, 3);
    ok(prout(&mut r, &a, sa::RESERVE, 1, 1, 0));
    let eff = ok(prout(&mut r, &b, sa::PREEMPT, 3, 2, 3));
    assert_eq!(reservation(&r), Some((1, 1)), "reservation untouched");
    assert_eq!(keys(&r).1, vec![1, 2]);
    assert_eq!(eff.unit_attentions.len(), 1);
    assert_eq!(*eff.unit_attentions[0].0, *c);
}

#[test]
fn preempt_all_registrants_with_zero_key() {
    let mut r = Reservations::new();
    let (a, b, c) = (nx(I1, 1), nx(I2, 1), nx(I3, 1));
    register(&mut r, &a, 1);
    register(&mut r, &b, 2);
    register(&mut r, &c, 3);
    ok(prout(&mut r, &a, sa::RESERVE, 8, 1, 0));
    let eff = ok(prout(
        &mut r,
        &b,
        sa::PREEMPT,
        pr_type::WRITE_EXCLUSIVE,
        2,
        0,
    ));
    assert_eq!(keys(&r).1, vec![2]);
    assert_eq!(reservation(&r), Some((2, pr_type::WRITE_EXCLUSIVE)));
    assert_eq!(eff.unit_attentions.len(), 2);
    assert!(eff
        .unit_attentions
        .iter()
        .all(|(_, s)| *s == UA_REGISTRATIONS_PREEMPTED));
}

#[test]
fn preempt_all_registrants_with_key_keeps_reservation() {
    let mut r = Reservations::new();
    let (a, b, c) = (nx(I1, 1), nx(I2, 1), nx(I3, 1));
    register(&mut r, &a, 1);
    register(&mut r, &b, 2);
    register(&mut r, &c, 3);
    ok(prout(&mut r, &a, sa::RESERVE, 7, 1, 0));
    ok(prout(&mut r, &b, sa::PREEMPT, 7, 2, 1));
    assert_eq!(keys(&r).1, vec![2, 3]);
    assert_eq!(reservation(&r), Some((0, 7)));
}

// ---- Unregistering the holder (libiscsi ProutReserveOwnership*) ----

#[test]
fn unregistering_holder_releases_unless_all_registrants() {
    for t in [1u8, 3, 5, 6, 7, 8] {
        let mut r = Reservations::new();
        let (a, b) = (nx(I1, 1), nx(I2, 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 2);
        ok(prout(&mut r, &a, sa::RESERVE, t, 1, 0));
        let eff = ok(prout(&mut r, &a, sa::REGISTER, 0, 1, 0));
        if is_all_registrants(t) {
            assert_eq!(reservation(&r), Some((0, t)));
            ok(prout(&mut r, &b, sa::RELEASE, t, 2, 0));
            assert_eq!(reservation(&r), None);
        } else {
            assert_eq!(reservation(&r), None, "type {t}");
            if t == 5 || t == 6 {
                assert_eq!(eff.unit_attentions.len(), 1);
                assert_eq!(*eff.unit_attentions[0].0, *b);
                assert_eq!(eff.unit_attentions[0].1, UA_RESERVATIONS_RELEASED);
            } else {
                assert!(eff.unit_attentions.is_empty());
            }
        }
        ok(prout(&mut r, &b, sa::REGISTER, 0, 2, 0));
        assert_eq!(keys(&r).1, Vec::<u64>::new());
    }
}

#[test]
fn all_registrants_reservation_ends_with_last_registrant() {
    let mut r = Reservations::new();
    let (a, b) = (nx(I1, 1), nx(I2, 1));
    register(&mut r, &a, 1);
    register(&mut r, &b, 2);
    ok(prout(&mut r, &a, sa::RESERVE, 7, 1, 0));
    ok(prout(&mut r, &a, sa::REGISTER, 0, 1, 0));
    assert!(reservation(&r).is_some());
    ok(prout(&mut r, &b, sa::REGISTER, 0, 2, 0));
    assert_eq!(reservation(&r), None);
}

// ---- Conflict table ----

/// (holder, registrant, non-registrant) x (read, write) expectations:
/// `true` = allowed.
fn access_matrix(t: u8) -> [(bool, bool); 3] {
    match t {
        1 => [(true, true), (true, false), (true, false)],
        3 => [(true, true), (false, false), (false, false)],
        5 | 7 => [(true, true), (true, true), (true, false)],
        6 | 8 => [(true, true), (true, true), (false, false)],
        _ => unreachable!(),
    }
}

#[test]
fn conflict_table_read_write_per_type() {
    for t in [1u8, 3, 5, 6, 7, 8] {
        let mut r = Reservations::new();
        let (holder, reg, unreg) = (nx(I1, 1), nx(I2, 1), nx(I3, 1));
        register(&mut r, &holder, 1);
        register(&mut r, &reg, 2);
        ok(prout(&mut r, &holder, sa::RESERVE, t, 1, 0));
        for (who, (rd, wr)) in [&holder, &reg, &unreg].into_iter().zip(access_matrix(t)) {
            assert_eq!(!r.conflicts(who, &READ10), rd, "type {t} read {who:?}");
            assert_eq!(!r.conflicts(who, &WRITE10), wr, "type {t} write {who:?}");
            assert_eq!(
                !r.conflicts(who, &SYNC_CACHE10),
                wr,
                "type {t} sync {who:?}"
            );
            // Always allowed.
            for cdb in [
                &INQUIRY[..],
                &TUR[..],
                &READ_CAP10[..],
                &READ_CAP16[..],
                &REPORT_LUNS[..],
                &REQUEST_SENSE[..],
                &PRIN_READ_KEYS[..],
                &prout_cdb(sa::REGISTER, 0, 0, 24)[..],
            ] {
                assert!(!r.conflicts(who, cdb), "type {t} {cdb:02x?}");
            }
            // RESERVE/RELEASE conflict for everyone while registered.
            assert!(r.conflicts(who, &RESERVE6));
            assert!(r.conflicts(who, &RELEASE6));
        }
        // MODE SENSE: allowed under Write Exclusive types, else only for
        // the holder and registrants of registrants-only types.
        let we = matches!(t, 1 | 5 | 7);
        assert!(!r.conflicts(&holder, &MODE_SENSE6));
        assert_eq!(!r.conflicts(&unreg, &MODE_SENSE6), we, "type {t}");
        assert_eq!(
            !r.conflicts(&reg, &MODE_SENSE6),
            we || is_registrants_type(t),
            "type {t}"
        );
    }
}

#[test]
fn libiscsi_access_after_unregistering_second_initiator() {
    // ProutReserveAccess*: after i2 unregisters it behaves as unregistered.
    for t in [1u8, 3, 5, 6, 7, 8] {
        let mut r = Reservations::new();
        let (a, b) = (nx(I1, 1), nx(I2, 1));
        register(&mut r, &a, 1);
        register(&mut r, &b, 1);
        ok(prout(&mut r, &a, sa::RESERVE, t, 1, 0));
        ok(prout(&mut r, &b, sa::REGISTER, 0, 1, 0));
        let (rd, wr) = access_matrix(t)[2];
        assert_eq!(!r.conflicts(&b, &READ10), rd);
        assert_eq!(!r.conflicts(&b, &WRITE10), wr);
        ok(prout(&mut r, &a, sa::RELEASE, t, 1, 0));
        ok(prout(&mut r, &a, sa::REGISTER, 0, 1, 0));
        assert!(!r.conflicts(&b, &WRITE10));
    }
}

#[test]
fn registrations_alone_do_not_conflict() {
    let mut r = Reservations::new();
    let a = nx(I1, 1);
    register(&mut r, &a, 1);
    assert!(!r.conflicts(&nx(I2, 1), &WRITE10));
    assert!(!r.conflicts(&nx(I2, 1), &[]));
}

// ---- SPC-2 RESERVE / RELEASE ----

#[test]
fn spc2_reserve_release_two_initiators() {
    let mut r = Reservations::new();
    let (a, b) = (nx(I1, 1), nx(I2, 1));
    assert!(r.reserve(&a).is_ok());
    assert!(r.reserve(&a).is_ok(), "re-reserve by holder");
    assert!(r.conflicts(&b, &RESERVE6));
    assert!(r.reserve(&b).is_err());
    // RELEASE from b passes the conflict check and does nothing.
    assert!(!r.conflicts(&b, &RELEASE6));
    r.release(&b);
    assert!(!r.conflicts(&a, &MODE_SENSE6));
    assert!(r.conflicts(&b, &MODE_SENSE6));
    assert!(r.conflicts(&b, &READ10));
    assert!(r.conflicts(&b, &WRITE10));
    assert!(r.conflicts(&b, &TUR));
    assert!(r.conflicts(&b, &prout_cdb(sa::REGISTER, 0, 0, 24)));
    assert!(!r.conflicts(&b, &INQUIRY));
    assert!(!r.conflicts(&b, &REPORT_LUNS));
    assert!(!r.conflicts(&b, &REQUEST_SENSE));
    assert!(!r.conflicts(&a, &WRITE10));
    r.release(&a);
    assert!(r.reserve(&b).is_ok());
    r.release(&b);
    assert!(!r.conflicts(&a, &WRITE10));
}

#[test]
fn spc2_dropped_on_reset_and_nexus_loss() {
    let mut r = Reservations::new();
    let (a, b) = (nx(I1, 1), nx(I2, 1));
    r.reserve(&a).unwrap();
    r.reset();
    assert!(r.reserve(&b).is_ok());
    r.nexus_removed(&a); // not the holder: no effect
    assert!(r.reserve(&a).is_err());
    r.nexus_removed(&b);
    assert!(r.reserve(&a).is_ok());
}

#[test]
fn spc2_conflicts_with_persistent_registrations() {
    let mut r = Reservations::new();
    let (a, b) = (nx(I1, 1), nx(I2, 1));
    register(&mut r, &a, 1);
    assert!(r.reserve(&a).is_err());
    assert!(r.reserve(&b).is_err());
    ok(prout(&mut r, &a, sa::REGISTER, 0, 1, 0));
    assert!(r.reserve(&b).is_ok());
}

#[test]
fn persistent_state_survives_reset_and_nexus_loss() {
    let mut r = Reservations::new();
    let (a, b) = (nx(I1, 1), nx(I2, 1));
    register(&mut r, &a, 1);
    ok(prout(&mut r, &a, sa::RESERVE, 3, 1, 0));
    r.reset();
    r.nexus_removed(&a);
    assert_eq!(reservation(&r), Some((1, 3)));
    assert!(r.conflicts(&b, &READ10));
}

// ---- REGISTER AND MOVE ----

fn move_param(rk: u64, sark: u64, unreg: bool, rel_port: u16, tid: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&rk.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    p[17] = if unreg { 0x02 } else { 0 };
    p[18..20].copy_from_slice(&rel_port.to_be_bytes());
    p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend_from_slice(tid);
    p
}

#[test]
fn register_and_move() {
    let mut r = Reservations::new();
    let (a, b) = (nx(I1, 1), nx(I2, 7));
    register(&mut r, &a, 1);
    ok(prout(&mut r, &a, sa::RESERVE, 1, 1, 0));
    let tid = transport_id(&b);
    let p = move_param(1, 0x99, true, 1, &tid);
    let cdb = prout_cdb(sa::REGISTER_AND_MOVE, 0, 3, p.len() as u32);
    // Wrong key: conflict.
    let bad = move_param(2, 0x99, true, 1, &tid);
    assert!(matches!(
        r.persistent_reserve_out(&a, &cdb, &bad),
        Err(None)
    ));
    // Wrong relative port.
    let bad = move_param(1, 0x99, true, 2, &tid);
    assert_eq!(
        r.persistent_reserve_out(&a, &cdb, &bad).err(),
        Some(Some(INVALID_FIELD_IN_PARAM))
    );
    // Format 00b TransportID (no ISID).
    let mut tid0 = tid.clone();
    tid0[0] = PROTOCOL_ISCSI;
    let bad = move_param(1, 0x99, true, 1, &tid0);
    assert_eq!(
        r.persistent_reserve_out(&a, &cdb, &bad).err(),
        Some(Some(INVALID_FIELD_IN_PARAM))
    );
    // Truncated TransportID.
    let short = &p[..30];
    let cdb_short = prout_cdb(sa::REGISTER_AND_MOVE, 0, 3, 30);
    assert_eq!(
        r.persistent_reserve_out(&a, &cdb_short, short).err(),
        Some(Some(PARAM_LIST_LENGTH_ERROR))
    );
    ok(r.persistent_reserve_out(&a, &cdb, &p));
    assert_eq!(keys(&r).1, vec![0x99]);
    assert_eq!(reservation(&r), Some((0x99, 3)));
    assert!(r.conflicts(&a, &READ10));
    assert!(!r.conflicts(&b, &WRITE10));
    // a is no longer registered: cannot move it back.
    let back = move_param(1, 1, false, 1, &transport_id(&a));
    let cdb = prout_cdb(sa::REGISTER_AND_MOVE, 0, 3, back.len() as u32);
    assert!(matches!(
        r.persistent_reserve_out(&a, &cdb, &back),
        Err(None)
    ));
}

#[test]
fn transport_id_parser_rejects_garbage() {
    assert_eq!(parse_iscsi_transport_id(&[]), None);
    assert_eq!(parse_iscsi_transport_id(&[0x45, 0, 0, 200, b'a']), None);
    let mut t = vec![0x45, 0, 0, 20];
    t.extend_from_slice(b"iqn.x,i,0xzz\0\0\0\0\0\0\0\0");
    assert_eq!(parse_iscsi_transport_id(&t), None);
    let mut t = vec![0x41, 0, 0, 20];
    t.extend_from_slice(b"iqn.x,i,0x0102030405");
    assert_eq!(parse_iscsi_transport_id(&t), None);
}

// ---- A write-protected (read-only) nexus ----

#[test]
fn write_protected_nexus_may_register_and_release_but_not_reserve() {
    let (w, ro) = (nx(I1, 1), nx(I2, 1));
    let spc2 = |op: u8| {
        let mut c = vec![0u8; 10];
        c[0] = op;
        c
    };
    let pr = |action: u8, ptype: u8| prout_cdb(action, 0, ptype, 24);
    let mut r = Reservations::new();
    // Whatever the state: a reservation of its own, any preemption, CLEAR
    // and REGISTER AND MOVE are refused; its own registration, SPC-2
    // RELEASE, PR IN and medium reads are not; an unknown service action is
    // left to the command itself. (Whether the nexus is write-protected is
    // the engine's to know; scsi::tests covers a writer's same commands.)
    let check_fixed = |r: &Reservations| {
        for refused in [
            spc2(0x16),
            spc2(0x56),
            pr(sa::RESERVE, 1),
            pr(sa::RESERVE, 8),
            pr(sa::PREEMPT, 1),
            pr(sa::PREEMPT_AND_ABORT, 3),
            pr(sa::CLEAR, 0),
            pr(sa::REGISTER_AND_MOVE, 3),
        ] {
            assert!(r.refuses_write_protected(&ro, &refused), "{refused:02x?}");
        }
        for allowed in [
            spc2(0x17),
            spc2(0x57),
            pr(sa::REGISTER, 0),
            pr(sa::REGISTER_AND_IGNORE, 0),
            pr(0x08, 0),
            vec![0x5e, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
            READ10.to_vec(),
        ] {
            assert!(!r.refuses_write_protected(&ro, &allowed), "{allowed:02x?}");
        }
    };
    check_fixed(&r);
    // RELEASE without a reservation changes nothing: allowed.
    assert!(!r.refuses_write_protected(&ro, &pr(sa::RELEASE, 1)));

    // The reader holds a Write Exclusive reservation alone (taken before
    // its ACL entry became read-only): giving it up is allowed.
    register(&mut r, &w, 1);
    register(&mut r, &ro, 2);
    ok(prout(
        &mut r,
        &ro,
        sa::RESERVE,
        pr_type::WRITE_EXCLUSIVE,
        2,
        0,
    ));
    check_fixed(&r);
    assert!(!r.refuses_write_protected(&ro, &pr(sa::RELEASE, 1)));
    ok(prout(
        &mut r,
        &ro,
        sa::RELEASE,
        pr_type::WRITE_EXCLUSIVE,
        2,
        0,
    ));
    assert_eq!(reservation(&r), None);
    assert!(!r.conflicts(&w, &WRITE10));

    // The writers' all-registrants reservation: the registered reader is a
    // holder, but may not end it for everyone.
    ok(prout(
        &mut r,
        &w,
        sa::RESERVE,
        pr_type::WRITE_EXCLUSIVE_ALL_REGISTRANTS,
        1,
        0,
    ));
    check_fixed(&r);
    assert!(r.refuses_write_protected(&ro, &pr(sa::RELEASE, 7)));
    // Unregistered, the reader holds nothing: its RELEASE would change
    // nothing, and is not refused as a write.
    ok(prout(&mut r, &ro, sa::REGISTER, 0, 2, 0));
    assert_eq!(reservation(&r), Some((0, 7)), "the writer still holds it");
    assert!(!r.refuses_write_protected(&ro, &pr(sa::RELEASE, 7)));

    // The writer's registrants-only reservation, the reader registered
    // (to read under Exclusive Access - Registrants Only): its RELEASE is
    // no holder's and passes.
    ok(prout(
        &mut r,
        &w,
        sa::RELEASE,
        pr_type::WRITE_EXCLUSIVE_ALL_REGISTRANTS,
        1,
        0,
    ));
    ok(prout(
        &mut r,
        &w,
        sa::RESERVE,
        pr_type::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        1,
        0,
    ));
    register(&mut r, &ro, 2);
    check_fixed(&r);
    assert!(!r.refuses_write_protected(&ro, &pr(sa::RELEASE, 6)));
    assert!(!r.conflicts(&ro, &READ10), "a registrant reads under EA-RO");
}
