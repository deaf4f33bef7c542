//! Sixteen members in one region (the ring protocol's most): fifteen
//! senders to one receiver, over a polled region and over a doorbell region
//! (each sender's frames announced by a doorbell to the receiver when it
//! sleeps), every stream checksummed.

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
