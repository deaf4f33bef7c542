//! Sixteen members in one region (the ring protocol's most): fifteen
//! senders to one receiver, and all 240 ordered pairs at once, over a
//! polled region and over a doorbell region (with a vector per peer), every
//! stream checksummed; and big regions.

mod common;

use common::{assert_received_clean, run_config_ok};
use intervm_testkit::kvm_available;

fn sixteen_to_one(kind: &str) {
    if !kvm_available() {
        return;
    }
    let senders: Vec<String> = (1..16).map(|i| format!("s{i}")).collect();
    let mut body = String::new();
    for s in &senders {
        body += &format!(
            "[[vm]]\nname = \"{s}\"\nmemory = \"64M\"\nserial = \"none\"\n\
             probe = {{ task = \"send\", channel = \"c\", to = \"r\", size = \"4M\" }}\n"
        );
    }
    let from: Vec<String> = senders.iter().map(|s| format!("\"{s}\"")).collect();
    body += &format!(
        "[[vm]]\nname = \"r\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = {{ task = \"recv\", channel = \"c\", from = [{}], size = \"4M\" }}\n\
         [[channel]]\nname = \"c\"\nkind = \"{kind}\"\nmembers = [{}, \"r\"]\nsize = \"16M\"\n",
        from.join(", "),
        from.join(", ")
    );
    let out = run_config_ok(&format!("sixteen-{kind}.toml"), &body);
    for s in &senders {
        assert_received_clean(&out, &format!("r: received 4 MiB of 4 MiB from {s} over c"));
    }
}

#[test]
fn sixteen_members_share_one_polled_region() {
    sixteen_to_one("shmem");
}

#[test]
fn sixteen_members_share_one_doorbell_region() {
    sixteen_to_one("doorbell");
}

/// Sixteen members each exchanging 1 MiB both ways with every other at
/// once (240 rings in use); `extra` adds channel keys. Returns the output.
fn sixteen_all_pairs(kind: &str, extra: &str) -> Option<String> {
    if !kvm_available() {
        return None;
    }
    let names: Vec<String> = (0..16).map(|i| format!("m{i}")).collect();
    let mut body = String::new();
    for n in &names {
        body += &format!(
            "[[vm]]\nname = \"{n}\"\nmemory = \"64M\"\nserial = \"none\"\n\
             probe = {{ task = \"exchange\", channel = \"c\", size = \"1M\" }}\n"
        );
    }
    let members: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    body += &format!(
        "[[channel]]\nname = \"c\"\nkind = \"{kind}\"\nmembers = [{}]\nsize = \"16M\"\n{extra}",
        members.join(", ")
    );
    let out = run_config_ok(&format!("sixteen-pairs-{kind}.toml"), &body);
    for r in &names {
        assert!(
            out.contains(&format!(
                "{r}: sent 1 MiB of 1 MiB to each of 15 peers over c: complete"
            )),
            "{r} did not send everything:\n{out}"
        );
        for s in names.iter().filter(|s| *s != r) {
            assert_received_clean(
                &out,
                &format!("{r}: received 1 MiB of 1 MiB from {s} over c"),
            );
        }
    }
    Some(out)
}

#[test]
fn sixteen_members_exchange_all_pairs_over_a_polled_region() {
    sixteen_all_pairs("shmem", "");
}

#[test]
fn sixteen_members_exchange_all_pairs_with_a_vector_per_peer() {
    // Each member rings member m on vector (its own index), after every
    // frame and once more at the end, and waits for that last doorbell of
    // every peer on the peer's vector: each peer's vector fired.
    let Some(out) = sixteen_all_pairs("doorbell", "vectors = 16\nnotify = \"always\"\n") else {
        return;
    };
    for r in 0..16 {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("m{r}: interrupts by vector over c: ")))
            .unwrap_or_else(|| panic!("no interrupt counts of m{r}:\n{out}"));
        let counts: Vec<u64> = line
            .rsplit(": ")
            .next()
            .unwrap_or("")
            .split(' ')
            .map(|vc| {
                vc.split(':')
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        assert_eq!(counts.len(), 16, "{line}");
        for (v, n) in counts.iter().enumerate() {
            assert!(
                v == r || *n > 0,
                "m{r}: nothing from m{v} on vector {v}: {line}"
            );
        }
    }
}

#[test]
fn sixteen_members_exchange_all_pairs_with_adaptive_doorbells() {
    sixteen_all_pairs("doorbell", "vectors = 16\n");
}

#[test]
fn a_one_gib_region_carries_checked_data() {
    // Rings of 512 MiB: the probe receiver accepts frames up to its own
    // buffer (it refused the region outright before).
    if !kvm_available() {
        return;
    }
    let body = "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
                probe = { task = \"send\", channel = \"c\", to = \"b\", size = \"2G\" }\n\
                [[vm]]\nname = \"b\"\nmemory = \"64M\"\nserial = \"none\"\n\
                probe = { task = \"recv\", channel = \"c\", size = \"2G\" }\n\
                [[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"1G\"\n";
    let out = run_config_ok("one-gib.toml", body);
    assert_received_clean(&out, "b: received 2 GiB of 2 GiB from a over c");
}

#[test]
fn an_eight_gib_region_above_4_gib_carries_checked_data_both_ways() {
    // An 8 GiB BAR (sparse memfd) can only sit in the 64-bit window above
    // 4 GiB. Rings of 2 GiB: a -> b wraps its ring once, and b -> a runs in
    // the second ring, 2 GiB into the BAR.
    if !kvm_available() {
        return;
    }
    let body = "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
                probe = [{ task = \"send\", channel = \"c\", to = \"b\", size = \"2G\" },\n\
                { task = \"recv\", channel = \"c\", size = \"64M\" }]\n\
                [[vm]]\nname = \"b\"\nmemory = \"64M\"\nserial = \"none\"\n\
                probe = [{ task = \"recv\", channel = \"c\", size = \"2G\" },\n\
                { task = \"send\", channel = \"c\", to = \"a\", size = \"64M\" }]\n\
                [[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"8G\"\n";
    let out = run_config_ok("eight-gib.toml", body);
    assert_received_clean(&out, "b: received 2 GiB of 2 GiB from a over c");
    assert_received_clean(&out, "a: received 64 MiB of 64 MiB from b over c");
}

#[test]
fn four_regions_of_different_kinds_in_one_vm() {
    // Each VM has four channels at once: an anonymous polled region, a
    // 1 GiB region on /dev/shm, a doorbell region and a port-I/O block,
    // and moves checked data over each in turn.
    if !kvm_available() {
        return;
    }
    /// Removes the /dev/shm object (up to 1 GiB of memory) even when an
    /// assertion fails.
    struct Removed(String);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(format!("/dev/shm/{}", self.0));
        }
    }
    let shm = format!("intervm-scale-four-{}", std::process::id());
    let _cleanup = Removed(shm.clone());
    let body = format!(
        "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = [\n  {{ task = \"send\", channel = \"small\", to = \"b\", size = \"16M\" }},\n  \
         {{ task = \"send\", channel = \"big\", to = \"b\", size = \"1G\" }},\n  \
         {{ task = \"send\", channel = \"bell\", to = \"b\", size = \"64M\" }},\n  \
         {{ task = \"send\", channel = \"pio\", to = \"b\", size = \"64K\" }},\n]\n\
         [[vm]]\nname = \"b\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = [\n  {{ task = \"recv\", channel = \"small\", size = \"16M\" }},\n  \
         {{ task = \"recv\", channel = \"big\", size = \"1G\" }},\n  \
         {{ task = \"recv\", channel = \"bell\", size = \"64M\" }},\n  \
         {{ task = \"recv\", channel = \"pio\", size = \"64K\" }},\n]\n\
         [[channel]]\nname = \"small\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"64K\"\n\
         [[channel]]\nname = \"big\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"1G\"\n\
         backing = {{ shm = \"{shm}\" }}\n\
         [[channel]]\nname = \"bell\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\n\
         [[channel]]\nname = \"pio\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n"
    );
    let out = run_config_ok("four-regions.toml", &body);
    for (what, ch) in [
        ("16 MiB of 16 MiB", "small"),
        ("1 GiB of 1 GiB", "big"),
        ("64 MiB of 64 MiB", "bell"),
        ("64 KiB of 64 KiB", "pio"),
    ] {
        assert_received_clean(&out, &format!("b: received {what} from a over {ch}"));
    }
}
