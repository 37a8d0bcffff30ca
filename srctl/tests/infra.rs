//! Components that come and go at runtime, as in seed 004 where the Azure process server is
//! deployed for failback and deleted after: `infra add process-server` runs a "Deploy process
//! server" job that ends when the new one has registered (srctl starts it in the local lab);
//! `infra remove` stops it and revokes it, and refuses while items use it; a reprotect with no
//! process server in Azure is refused with ASR's error and changes nothing.

mod common;

use common::*;

#[test]
fn an_azure_process_server_is_deployed_for_failback_and_removed_after() {
    let lab_handle = Lab::up(&["--disk-size", "16MiB", "--machines", "1"]);
    let lab = lab_handle.dir.clone();

    let out = ok(srctl(
        &lab,
        &[
            "infra",
            "add",
            "process-server",
            "ps-azure-2",
            "--site",
            "azure",
        ],
    ));
    assert!(
        out.contains("Deploy process server ps-azure-2") && out.contains("Succeeded"),
        "{out}"
    );
    let added = infra(&lab, "ps-azure-2");
    assert_eq!(added["status"], "connected", "{added}");
    assert_eq!(added["site"], "azure", "{added}");
    assert!(ok(srctl(&lab, &["lab", "graph"])).contains("ps-azure-2"));
    let e = fails(srctl(
        &lab,
        &[
            "infra",
            "add",
            "process-server",
            "PS-AZURE-2",
            "--site",
            "azure",
        ],
    ));
    assert!(e.contains("already registered"), "{e}");

    ok(srctl(&lab, &["workload", "start", "vm1", "--rate", "1"]));
    ok(srctl(&lab, &["item", "enable", "vm1"]));
    eventually("vm1 Protected", 60, || {
        show(&lab, "vm1")["state"] == "Protected"
    });
    // What an item uses can't be removed.
    let e = fails(srctl(&lab, &["infra", "remove", "ps-onprem"]));
    assert!(e.contains("in use by vm1-1"), "{e}");
    ok(srctl(&lab, &["failover", "vm1"]));
    ok(srctl(&lab, &["commit", "vm1"]));
    wait_component(&lab, "vm1", "azure", "connected");

    // Both Azure process servers go: their processes stop, the reprotect has none to use.
    for ps in ["ps-azure", "ps-azure-2"] {
        let out = ok(srctl(&lab, &["infra", "remove", ps]));
        assert!(out.contains("process stopped"), "{out}");
        assert!(
            json(srctl(&lab, &["infra", "list", "--json"]))
                .as_array()
                .is_some_and(|all| all.iter().all(|c| c["name"] != ps)),
            "{ps} still listed"
        );
    }
    let before = show(&lab, "vm1");
    let e = fails(srctl(&lab, &["reprotect", "vm1"]));
    assert!(e.contains("806: no process server in azure"), "{e}");
    assert_eq!(show(&lab, "vm1")["id"], before["id"], "nothing changed");

    // Deployed again for the failback: the reprotect goes through it.
    ok(srctl(
        &lab,
        &[
            "infra",
            "add",
            "process-server",
            "ps-azure-3",
            "--site",
            "azure",
        ],
    ));
    ok(srctl(&lab, &["reprotect", "vm1"]));
    let v = show(&lab, "vm1");
    assert_eq!(v["process_server"], "ps-azure-3", "{v}");
    eventually("vm1 Protected back to on-premises", 60, || {
        show(&lab, "vm1")["state"] == "Protected"
    });
}
