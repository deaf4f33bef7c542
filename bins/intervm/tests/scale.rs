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
