//! Which of Redis Cluster's 16384 hash slots a key belongs to.
//!
//! A cluster routes every key by its slot, and a proxy in front of one must compute the same
//! slot Redis does, bit for bit: a key sent to the wrong node comes back `-MOVED`, and two
//! keys a client put under one hash tag must land together or a multi-key command that Redis
//! would run fails with `-CROSSSLOT`. So this follows Redis's own code exactly:
//! `keyHashSlot` (`src/cluster.h`, in `cluster.c` before 7.2) and `crc16` (`src/crc16.c`),
//! which is CRC-16/XMODEM (polynomial 0x1021, initial value 0, no reflection, no final xor),
//! keeping the low 14 bits.
//!
//! Hash tags: if the key has a `{`, and a `}` somewhere after that *first* `{`, and at least
//! one byte between them, only those bytes are hashed. Anything else — no `{`, no `}` after
//! it, or `{}` — hashes the whole key. Only the first `{` counts (`{a}{b}` hashes `a`, and
//! `}{a}` hashes `a` too, but `{}{a}` hashes the whole key).

/// The number of hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC-16/XMODEM's table, computed rather than copied (the unit tests compare it with
/// Redis's `crc16tab`).
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Redis's `crc16`: CRC-16/XMODEM of `bytes`.
pub fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from(((crc >> 8) as u8) ^ b)]
    })
}

/// Redis's `keyHashSlot`: the slot of `key`, hash tags honoured (see the module doc).
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) & (SLOTS as u16 - 1)
}

/// The keys of one command hash to different slots: Redis Cluster refuses such a command
/// (`getNodeByQuery`), whichever node gets it, even when both slots are on the same node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossSlot;

impl std::fmt::Display for CrossSlot {
    /// Redis's own error reply, without the leading `-`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CROSSSLOT Keys in request don't hash to the same slot")
    }
}

impl std::error::Error for CrossSlot {}

/// The one slot all of `keys` hash to (`None`: no keys), as Redis Cluster decides where a
/// command runs: every key in one slot, repeats allowed.
pub fn slot_of<'k>(keys: impl IntoIterator<Item = &'k [u8]>) -> Result<Option<u16>, CrossSlot> {
    let mut found = None;
    for key in keys {
        let slot = key_slot(key);
        match found {
            None => found = Some(slot),
            Some(first) if first != slot => return Err(CrossSlot),
            Some(_) => {}
        }
    }
    Ok(found)
}

/// The bytes of `key` that are hashed: its hash tag if it has a non-empty one, else all.
fn hashed_part(key: &[u8]) -> &[u8] {
    let Some(open) = memchr::memchr(b'{', key) else {
        return key;
    };
    match memchr::memchr(b'}', &key[open + 1..]) {
        // `close` counts from the byte after `{`: 0 is `{}`, which hashes the whole key.
        Some(close) if close > 0 => &key[open + 1..open + 1 + close],
        _ => key,
    }
}

/// Items grouped by slot: slots in the order their first item comes, each slot's items in
/// the order they came (a command split by slot keeps the client's key order).
pub fn by_slot<T>(items: impl IntoIterator<Item = (u16, T)>) -> Vec<(u16, Vec<T>)> {
    let mut groups: Vec<(u16, Vec<T>)> = Vec::new();
    let mut index: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    for (slot, item) in items {
        match index.entry(slot) {
            std::collections::hash_map::Entry::Occupied(e) => groups[*e.get()].1.push(item),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(groups.len());
                groups.push((slot, vec![item]));
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC check value every CRC-16/XMODEM implementation gives, quoted in `crc16.c`.
    #[test]
    fn crc16_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    /// The first and last rows of `crc16tab` in Redis's `src/crc16.c`.
    #[test]
    fn table_is_redis_crc16tab() {
        assert_eq!(
            CRC16_TABLE[..8],
            [
                0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7
            ]
        );
        assert_eq!(
            CRC16_TABLE[248..],
            [
                0x6e17, 0x7e36, 0x4e55, 0x5e74, 0x2e93, 0x3eb2, 0x0ed1, 0x1ef0
            ]
        );
    }

    /// Values Redis's own tests and documentation use.
    #[test]
    fn redis_test_vectors() {
        // tests/unit/moduleapi/misc.tcl: `assert_equal 12182 [r test.keyslot foo]`.
        assert_eq!(key_slot(b"foo"), 12182);
        // The cluster specification: "123456789" is slot 0x31C3 & 0x3FFF.
        assert_eq!(key_slot(b"123456789"), 12739);
        // The cluster tutorial's examples (`CLUSTER KEYSLOT`).
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo{hash_tag}"), 2515);
        assert_eq!(key_slot(b"bar{hash_tag}"), 2515);
        assert_eq!(key_slot(b""), 0);
    }

    /// Redis's `src/crc16_slottable.h`: for every slot, the shortest alphanumeric string
    /// Redis maps to it (redis-benchmark and the module API rely on it).
    #[test]
    fn every_slot_of_redis_slot_table() {
        let header = include_str!("../../tests/fixtures/crc16_slottable.h");
        let table = header
            .split_once("crc16_slot_table[] = {")
            .map(|(_, rest)| rest)
            .expect("the table's start");
        let names: Vec<&str> = table
            .split('"')
            .skip(1)
            .step_by(2)
            .take_while(|s| !s.contains(';'))
            .collect();
        assert_eq!(names.len(), SLOTS);
        for (slot, name) in names.iter().enumerate() {
            assert_eq!(usize::from(key_slot(name.as_bytes())), slot, "{name}");
            // A tag around it hashes the same; text around a tag does not matter.
            let tagged = format!("user:{{{name}}}:settings");
            assert_eq!(usize::from(key_slot(tagged.as_bytes())), slot, "{tagged}");
        }
    }

    #[test]
    fn one_slot_or_crossslot() {
        assert_eq!(slot_of([]), Ok(None));
        assert_eq!(slot_of([&b"a"[..], b"a"]), Ok(Some(key_slot(b"a"))));
        assert_eq!(
            slot_of([&b"{user1}:a"[..], b"{user1}:b", b"user1"]),
            Ok(Some(key_slot(b"user1")))
        );
        // `foo` (12182) and `bar` (5061) are in different slots.
        assert_eq!(slot_of([&b"foo"[..], b"bar"]), Err(CrossSlot));
        assert_eq!(
            CrossSlot.to_string(),
            "CROSSSLOT Keys in request don't hash to the same slot"
        );
    }

    #[test]
    fn hash_tags_as_key_hash_slot_reads_them() {
        let whole = |k: &[u8]| crc16(k) & 0x3FFF;
        // No `{`, no `}` after it, or an empty tag: the whole key.
        for key in [
            &b"{"[..],
            b"}",
            b"}{",
            b"{}",
            b"{}{a}",
            b"a{",
            b"a{b",
            b"{{",
            b"x}y",
        ] {
            assert_eq!(
                key_slot(key),
                whole(key),
                "{}",
                String::from_utf8_lossy(key)
            );
        }
        // The first `{` and the first `}` after it.
        assert_eq!(key_slot(b"{a}{b}"), key_slot(b"a"));
        assert_eq!(key_slot(b"}{a}"), key_slot(b"a"));
        assert_eq!(key_slot(b"{{a}}"), key_slot(b"{a"));
        assert_eq!(key_slot(b"x{a}}"), key_slot(b"a"));
        assert_eq!(key_slot(b"{ab}c"), key_slot(b"ab"));
        assert_eq!(key_slot(b"{\x00}"), key_slot(b"\x00"));
        // Binary keys: any byte, including CR, LF and invalid UTF-8.
        assert_eq!(key_slot(b"\xff\xfe{\r\n}"), key_slot(b"\r\n"));
    }

    #[test]
    fn items_grouped_by_slot_keep_their_order() {
        let grouped = by_slot([(7, 'a'), (3, 'b'), (7, 'c'), (9, 'd'), (3, 'e')]);
        assert_eq!(
            grouped,
            vec![(7, vec!['a', 'c']), (3, vec!['b', 'e']), (9, vec!['d'])]
        );
        assert!(by_slot(Vec::<(u16, u8)>::new()).is_empty());
    }
}
