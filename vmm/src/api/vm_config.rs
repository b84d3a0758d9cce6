//! `vm.create`'s body: Cloud Hypervisor's `VmConfig`, the fields Bulkhead has a concept for,
//! turned into the command-line options they mean ([`VmSpec`]). The VMM then checks them with
//! the command line's own parser (`VmConfig::try_from(Args)`), so a VM created through the API
//! is checked exactly as one started with `--kernel`. Pure (no I/O): it runs in an API thread.

use std::path::PathBuf;

use bulkhead_firmware::layout::MAX_PCI_SLOTS;
use serde::Deserialize;

use super::http::HttpResponse;
use super::routes::{disk_options, net_options};
use crate::config::Args;

fn bad(message: impl Into<String>) -> HttpResponse {
    HttpResponse::error(400, message)
}

/// A VM as `vm.create` describes it, in command-line form. `None` leaves the VMM's command
/// line value (its default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSpec {
    /// `--cpus`.
    pub cpus: Option<String>,
    /// `--memory`.
    pub memory: Option<String>,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initramfs`.
    pub initramfs: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--firmware`.
    pub firmware: Option<PathBuf>,
    /// `--serial`.
    pub serial: Option<String>,
    /// `--console`.
    pub console: Option<String>,
    /// `--disk`, each.
    pub disks: Vec<String>,
    /// `--net`, each.
    pub nets: Vec<String>,
    /// `--balloon`.
    pub balloon: Option<String>,
    /// `--pci-slots`.
    pub pci_slots: Option<usize>,
}

impl VmSpec {
    /// The command line the VM would have been started with: the VMM's own (its `--sandbox`,
    /// `--api-socket`, `--device-uid`, `--cgroup-parent`, and the defaults) with this VM's
    /// options in place.
    pub fn apply(&self, base: &Args) -> Args {
        let mut a = base.clone();
        a.kernel.clone_from(&self.kernel);
        a.initramfs.clone_from(&self.initramfs);
        a.firmware.clone_from(&self.firmware);
        if let Some(c) = &self.cmdline {
            a.cmdline.clone_from(c);
        }
        if let Some(c) = &self.cpus {
            a.cpus = crate::config::overlay_options(&base.cpus, c);
        }
        if let Some(m) = &self.memory {
            a.memory.clone_from(m);
        }
        if let Some(s) = &self.serial {
            a.serial.clone_from(s);
        }
        if let Some(c) = &self.console {
            a.console.clone_from(c);
        }
        a.disk.clone_from(&self.disks);
        a.net.clone_from(&self.nets);
        a.balloon.clone_from(&self.balloon);
        if let Some(n) = self.pci_slots {
            a.pci_slots = n;
        }
        a
    }
}

/// Cloud Hypervisor's `CpusConfig`.
#[derive(Deserialize)]
struct CpusBody {
    boot_vcpus: u32,
    #[serde(default)]
    max_vcpus: Option<u32>,
}

/// Cloud Hypervisor's `MemoryConfig`.
#[derive(Deserialize)]
struct MemoryBody {
    size: u64,
    #[serde(default)]
    hugepages: bool,
    #[serde(default)]
    hugepage_size: Option<u64>,
    #[serde(default)]
    thp: Option<bool>,
    #[serde(default)]
    hotplug_size: Option<u64>,
    #[serde(default)]
    zones: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    mergeable: bool,
}

/// Cloud Hypervisor's `PayloadConfig`.
#[derive(Deserialize)]
struct PayloadBody {
    #[serde(default)]
    kernel: Option<PathBuf>,
    #[serde(default)]
    initramfs: Option<PathBuf>,
    #[serde(default)]
    cmdline: Option<String>,
    #[serde(default)]
    firmware: Option<PathBuf>,
    #[serde(default)]
    igvm: Option<String>,
}

/// Cloud Hypervisor's `ConsoleConfig` (for `serial` and `console`).
#[derive(Deserialize)]
struct ConsoleBody {
    mode: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    socket: Option<String>,
    #[serde(default)]
    iommu: bool,
}

/// Cloud Hypervisor's `BalloonConfig`, and Bulkhead's `stats_polling_interval_s`.
#[derive(Deserialize)]
struct BalloonBody {
    size: u64,
    #[serde(default)]
    deflate_on_oom: bool,
    #[serde(default)]
    free_page_reporting: bool,
    #[serde(default)]
    stats_polling_interval_s: Option<u32>,
}

/// Cloud Hypervisor's `VmConfig`, the fields Bulkhead reads. Devices it does not have are
/// refused when asked for; anything else (`rng`, `platform`, `cpus.topology`, ...) is
/// ignored.
#[derive(Deserialize)]
struct VmConfigBody {
    #[serde(default)]
    cpus: Option<CpusBody>,
    #[serde(default)]
    memory: Option<MemoryBody>,
    payload: Option<PayloadBody>,
    #[serde(default)]
    disks: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    net: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    balloon: Option<BalloonBody>,
    #[serde(default)]
    serial: Option<ConsoleBody>,
    #[serde(default)]
    console: Option<ConsoleBody>,
    /// Bulkhead's own: root ports (`--pci-slots`).
    #[serde(default)]
    pci_slots: Option<usize>,
    #[serde(default)]
    iommu: bool,
    #[serde(default)]
    watchdog: bool,
    #[serde(default)]
    fs: Option<serde_json::Value>,
    #[serde(default)]
    pmem: Option<serde_json::Value>,
    #[serde(default)]
    devices: Option<serde_json::Value>,
    #[serde(default)]
    user_devices: Option<serde_json::Value>,
    #[serde(default)]
    vdpa: Option<serde_json::Value>,
    #[serde(default)]
    vsock: Option<serde_json::Value>,
    #[serde(default)]
    numa: Option<serde_json::Value>,
    #[serde(default)]
    sgx_epc: Option<serde_json::Value>,
    #[serde(default)]
    tpm: Option<serde_json::Value>,
    #[serde(default)]
    pvpanic: bool,
    #[serde(default)]
    rate_limit_groups: Option<serde_json::Value>,
}

/// Whether an optional JSON value asks for something: not absent, null, `[]` or `{}`.
fn present(v: &Option<serde_json::Value>) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

/// A path or name handed on in a `key=VALUE` option: no comma (it would start the next one).
fn option_value(field: &str, v: &str) -> Result<String, HttpResponse> {
    if v.is_empty() || v.contains(',') {
        return Err(bad(format!("{field} {v:?}: expected a path without ','")));
    }
    Ok(v.to_string())
}

/// `serial` (the PL011) as `--serial`: Tty, File, Off (Null is Off).
fn serial_option(c: &ConsoleBody) -> Result<String, HttpResponse> {
    if c.iommu {
        return Err(bad("serial.iommu: Bulkhead has no virtual IOMMU"));
    }
    match c.mode.to_ascii_lowercase().as_str() {
        "off" | "null" => Ok("off".into()),
        "tty" => Ok("tty".into()),
        "file" => {
            let f = c
                .file
                .as_deref()
                .ok_or_else(|| bad("serial.mode File needs serial.file"))?;
            Ok(format!("file={}", option_value("serial.file", f)?))
        }
        m => Err(bad(format!(
            "serial.mode {m:?}: Bulkhead's PL011 goes to Tty, File or Off (a pty or socket is the virtio console's: console.mode)"
        ))),
    }
}

/// `console` (the virtio console) as `--console`: Off, Tty, Pty, File, Socket (Null is Off).
fn console_option(c: &ConsoleBody) -> Result<String, HttpResponse> {
    if c.iommu {
        return Err(bad("console.iommu: Bulkhead has no virtual IOMMU"));
    }
    match c.mode.to_ascii_lowercase().as_str() {
        "off" | "null" => Ok("off".into()),
        "tty" => Ok("tty".into()),
        "pty" => Ok("pty".into()),
        "file" => {
            let f = c
                .file
                .as_deref()
                .ok_or_else(|| bad("console.mode File needs console.file"))?;
            Ok(format!("file={}", option_value("console.file", f)?))
        }
        "socket" => {
            let s = c
                .socket
                .as_deref()
                .ok_or_else(|| bad("console.mode Socket needs console.socket"))?;
            Ok(format!("socket={}", option_value("console.socket", s)?))
        }
        m => Err(bad(format!(
            "console.mode {m:?}: expected Off, Tty, Pty, File or Socket"
        ))),
    }
}

/// Parses `vm.create`'s body. Each disk and interface goes through `vm.add-disk`'s and
/// `vm.add-net`'s own mapping; the whole is checked by the command line's parser later.
pub fn parse(body: &[u8]) -> Result<VmSpec, HttpResponse> {
    if body.is_empty() {
        return Err(bad(
            "vm.create needs a JSON body (Cloud Hypervisor's VmConfig)",
        ));
    }
    let b: VmConfigBody =
        serde_json::from_slice(body).map_err(|e| bad(format!("bad JSON body: {e}")))?;
    for (asked, what) in [
        (b.iommu, "iommu: Bulkhead has no virtual IOMMU"),
        (b.watchdog, "watchdog: Bulkhead has no watchdog device"),
        (b.pvpanic, "pvpanic: Bulkhead has no pvpanic device"),
        (present(&b.fs), "fs: Bulkhead has no virtio-fs device"),
        (present(&b.pmem), "pmem: Bulkhead has no virtio-pmem device"),
        (
            present(&b.devices),
            "devices: Bulkhead does not pass host devices through (VFIO)",
        ),
        (
            present(&b.user_devices),
            "user_devices: Bulkhead has no vfio-user devices",
        ),
        (present(&b.vdpa), "vdpa: Bulkhead has no vDPA devices"),
        (
            present(&b.vsock),
            "vsock: Bulkhead has no virtio-vsock device",
        ),
        (present(&b.numa), "numa: Bulkhead has no NUMA topology"),
        (present(&b.sgx_epc), "sgx_epc: not on arm64"),
        (present(&b.tpm), "tpm: Bulkhead has no TPM"),
        (
            present(&b.rate_limit_groups),
            "rate_limit_groups: Bulkhead limits each disk on its own (rate_limiter_config)",
        ),
    ] {
        if asked {
            return Err(bad(what));
        }
    }
    let mut spec = VmSpec::default();
    let payload = b.payload.ok_or_else(|| {
        bad("payload is required: payload.kernel (with initramfs, cmdline) or payload.firmware")
    })?;
    if payload.igvm.is_some() {
        return Err(bad("payload.igvm: not on arm64"));
    }
    match (&payload.kernel, &payload.firmware) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "payload: give kernel or firmware, not both (firmware boots the disks)",
            ))
        }
        (None, None) => return Err(bad("payload: kernel or firmware is required")),
        (None, Some(_)) if payload.initramfs.is_some() || payload.cmdline.is_some() => {
            return Err(bad(
                "payload.firmware takes no initramfs or cmdline (the firmware boots the disks)",
            ))
        }
        _ => {}
    }
    spec.kernel = payload.kernel;
    spec.firmware = payload.firmware;
    spec.initramfs = payload.initramfs;
    spec.cmdline = payload.cmdline;
    if let Some(c) = b.cpus {
        if c.max_vcpus.is_some_and(|m| m != c.boot_vcpus) {
            return Err(bad(
                "cpus.max_vcpus: Bulkhead has no vCPU hot-plug (give max_vcpus = boot_vcpus or leave it out)",
            ));
        }
        spec.cpus = Some(format!("boot={}", c.boot_vcpus));
    }
    if let Some(m) = b.memory {
        if m.hotplug_size.is_some_and(|s| s > 0) {
            return Err(bad("memory.hotplug_size: Bulkhead has no memory hot-plug"));
        }
        if m.zones.as_ref().is_some_and(|z| !z.is_empty()) {
            return Err(bad("memory.zones: Bulkhead has one memory region"));
        }
        if m.mergeable {
            return Err(bad(
                "memory.mergeable: Bulkhead does not merge guest pages (KSM)",
            ));
        }
        let mut opt = format!("size={}", m.size);
        if m.hugepages {
            opt.push_str(",hugepages=on");
            if let Some(s) = m.hugepage_size {
                opt.push_str(&format!(",hugepage_size={s}"));
            }
        } else if m.hugepage_size.is_some() {
            return Err(bad("memory.hugepage_size needs memory.hugepages: true"));
        }
        if m.thp == Some(false) {
            opt.push_str(",thp=off");
        }
        spec.memory = Some(opt);
    }
    if let Some(s) = &b.serial {
        spec.serial = Some(serial_option(s)?);
    }
    if let Some(c) = &b.console {
        spec.console = Some(console_option(c)?);
    }
    let (disks, nets) = (b.disks.unwrap_or_default(), b.net.unwrap_or_default());
    // Each device needs a slot: more than the most slots there can be is refused before any
    // is looked at (the main thread would open every image only to refuse them).
    if disks.len() + nets.len() > MAX_PCI_SLOTS {
        return Err(bad(format!(
            "{} disks and {} network interfaces: at most {MAX_PCI_SLOTS} devices (one per PCIe slot)",
            disks.len(),
            nets.len()
        )));
    }
    for (i, d) in disks.iter().enumerate() {
        let one = serde_json::to_vec(d).map_err(|e| bad(format!("disks[{i}]: {e}")))?;
        let opts = disk_options(&one).map_err(|r| prefixed(r, &format!("disks[{i}]")))?;
        spec.disks.push(opts);
    }
    for (i, n) in nets.iter().enumerate() {
        let one = serde_json::to_vec(n).map_err(|e| bad(format!("net[{i}]: {e}")))?;
        let opts = net_options(&one).map_err(|r| prefixed(r, &format!("net[{i}]")))?;
        spec.nets.push(opts);
    }
    if let Some(bl) = b.balloon {
        let mut opt = format!("size={}", bl.size);
        if bl.deflate_on_oom {
            opt.push_str(",deflate_on_oom=on");
        }
        if bl.free_page_reporting {
            opt.push_str(",free_page_reporting=on");
        }
        if let Some(s) = bl.stats_polling_interval_s {
            opt.push_str(&format!(",stats_polling_interval_s={s}"));
        }
        spec.balloon = Some(opt);
    }
    spec.pci_slots = b.pci_slots;
    Ok(spec)
}

/// An error answer about one element of a list, its message prefixed with where it is.
fn prefixed(r: HttpResponse, at: &str) -> HttpResponse {
    let message = r
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str::<Vec<String>>(b).ok())
        .and_then(|m| m.into_iter().next())
        .unwrap_or_default();
    HttpResponse::error(r.status, format!("{at}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn status(body: &[u8]) -> u16 {
        match parse(body) {
            Ok(s) => panic!("accepted {}: {s:?}", String::from_utf8_lossy(body)),
            Err(r) => r.status,
        }
    }

    #[test]
    fn test_vm_config_kata_shaped_body_maps_to_options() {
        // What Kata Containers' Cloud Hypervisor driver sends, less what Bulkhead refuses.
        let body = br#"{
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": {"threads_per_core": 1}},
            "memory": {"size": 1073741824, "shared": true, "hugepages": false, "thp": true},
            "payload": {"kernel": "/k/Image", "initramfs": "/k/initrd", "cmdline": "console=ttyAMA0 quiet"},
            "disks": [{"path": "/img/root.raw", "readonly": true, "id": "root"}],
            "net": [{"tap": "tap0", "mac": "52:54:00:00:00:01", "id": "eth0", "num_queues": 2}],
            "rng": {"src": "/dev/urandom"},
            "serial": {"mode": "Tty"},
            "console": {"mode": "Off"},
            "balloon": {"size": 0, "deflate_on_oom": true},
            "platform": {"num_pci_segments": 1},
            "pci_slots": 4,
            "fs": null, "pmem": [], "vsock": null, "iommu": false
        }"#;
        let spec = parse(body).expect("valid");
        assert_eq!(
            spec,
            VmSpec {
                cpus: Some("boot=2".into()),
                memory: Some("size=1073741824".into()),
                kernel: Some("/k/Image".into()),
                initramfs: Some("/k/initrd".into()),
                cmdline: Some("console=ttyAMA0 quiet".into()),
                firmware: None,
                serial: Some("tty".into()),
                console: Some("off".into()),
                disks: vec!["path=/img/root.raw,readonly=on,id=root".into()],
                nets: vec!["tap=tap0,mac=52:54:00:00:00:01,num_queues=2,id=eth0".into()],
                balloon: Some("size=0,deflate_on_oom=on".into()),
                pci_slots: Some(4),
            }
        );
        let base = Args::try_parse_from(["bulkhead", "--api-socket", "/run/a.sock", "-v"])
            .expect("parses");
        let args = spec.apply(&base);
        assert_eq!(
            args.kernel.as_deref(),
            Some(std::path::Path::new("/k/Image"))
        );
        assert_eq!(args.cpus, "boot=2");
        assert_eq!(args.disk.len(), 1);
        assert_eq!(args.pci_slots, 4);
        assert_eq!(args.api_socket.as_deref(), Some("/run/a.sock"));
        assert_eq!(args.verbose, 1);
        // Left out: the command line's values.
        let minimal = parse(br#"{"payload": {"kernel": "/k"}}"#).expect("valid");
        let args = minimal.apply(&base);
        assert_eq!(
            (args.cpus.as_str(), args.memory.as_str()),
            ("boot=1", "size=512M")
        );
        assert_eq!(args.cmdline, crate::config::DEFAULT_CMDLINE);
        assert_eq!(args.serial, "tty");
        // The command line's other --cpus options stay when the body gives cpus.
        let base = Args::try_parse_from([
            "bulkhead",
            "--api-socket",
            "/run/a.sock",
            "--cpus",
            "boot=1,pauth=off",
        ])
        .expect("parses");
        assert_eq!(spec.apply(&base).cpus, "boot=2,pauth=off");
    }

    #[test]
    fn test_vm_config_memory_console_and_firmware_options() {
        let spec = parse(
            br#"{"payload": {"firmware": "/fw/AAVMF_CODE.fd"},
                 "memory": {"size": 2147483648, "hugepages": true, "hugepage_size": 2097152},
                 "serial": {"mode": "File", "file": "/tmp/s.log"},
                 "console": {"mode": "Socket", "socket": "/tmp/c.sock"}}"#,
        )
        .expect("valid");
        assert_eq!(
            spec.firmware.as_deref(),
            Some(std::path::Path::new("/fw/AAVMF_CODE.fd"))
        );
        assert_eq!(
            spec.memory.as_deref(),
            Some("size=2147483648,hugepages=on,hugepage_size=2097152")
        );
        assert_eq!(spec.serial.as_deref(), Some("file=/tmp/s.log"));
        assert_eq!(spec.console.as_deref(), Some("socket=/tmp/c.sock"));
        let spec = parse(
            br#"{"payload": {"kernel": "/k"}, "memory": {"size": 67108864, "thp": false},
                 "serial": {"mode": "Null"}, "console": {"mode": "Pty"}}"#,
        )
        .expect("valid");
        assert_eq!(spec.memory.as_deref(), Some("size=67108864,thp=off"));
        assert_eq!(spec.serial.as_deref(), Some("off"));
        assert_eq!(spec.console.as_deref(), Some("pty"));
    }

    #[test]
    fn test_vm_config_bad_bodies_refused() {
        for body in [
            &b""[..],
            b"{",
            b"[]",
            b"null",
            b"{}",
            br#"{"payload": {}}"#,
            br#"{"payload": {"kernel": 7}}"#,
            br#"{"payload": {"kernel": "/k", "firmware": "/f"}}"#,
            br#"{"payload": {"firmware": "/f", "cmdline": "x"}}"#,
            br#"{"payload": {"kernel": "/k", "igvm": "/i"}}"#,
            br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 4}}"#,
            br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": -1}}"#,
            br#"{"payload": {"kernel": "/k"}, "cpus": {}}"#,
            br#"{"payload": {"kernel": "/k"}, "memory": {"size": 1073741824, "hotplug_size": 1073741824}}"#,
            br#"{"payload": {"kernel": "/k"}, "memory": {"size": 1073741824, "zones": [{}]}}"#,
            br#"{"payload": {"kernel": "/k"}, "memory": {"size": 1073741824, "mergeable": true}}"#,
            br#"{"payload": {"kernel": "/k"}, "memory": {"size": 1073741824, "hugepage_size": 2097152}}"#,
            br#"{"payload": {"kernel": "/k"}, "memory": {"size": "1G"}}"#,
            br#"{"payload": {"kernel": "/k"}, "serial": {"mode": "Pty"}}"#,
            br#"{"payload": {"kernel": "/k"}, "serial": {"mode": "File"}}"#,
            br#"{"payload": {"kernel": "/k"}, "serial": {"mode": "File", "file": "/a,b"}}"#,
            br#"{"payload": {"kernel": "/k"}, "console": {"mode": "Socket"}}"#,
            br#"{"payload": {"kernel": "/k"}, "console": {"mode": "Telnet"}}"#,
            br#"{"payload": {"kernel": "/k"}, "console": {"mode": "Tty", "iommu": true}}"#,
            br#"{"payload": {"kernel": "/k"}, "disks": [{}]}"#,
            br#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/a", "iommu": true}]}"#,
            br#"{"payload": {"kernel": "/k"}, "disks": {"path": "/a"}}"#,
            br#"{"payload": {"kernel": "/k"}, "net": [{"tap": "t", "fds": [3]}]}"#,
            br#"{"payload": {"kernel": "/k"}, "net": [{}]}"#,
            br#"{"payload": {"kernel": "/k"}, "vsock": {"cid": 3, "socket": "/v"}}"#,
            br#"{"payload": {"kernel": "/k"}, "fs": [{"tag": "t", "socket": "/s"}]}"#,
            br#"{"payload": {"kernel": "/k"}, "iommu": true}"#,
            br#"{"payload": {"kernel": "/k"}, "watchdog": true}"#,
            br#"{"payload": {"kernel": "/k"}, "balloon": {"deflate_on_oom": true}}"#,
            br#"{"payload": {"kernel": "/k"}, "pci_slots": -1}"#,
        ] {
            assert_eq!(status(body), 400, "{}", String::from_utf8_lossy(body));
        }
        let many = format!(
            r#"{{"payload": {{"kernel": "/k"}}, "disks": [{}]}}"#,
            vec![r#"{"path": "/a"}"#; 32].join(",")
        );
        assert_eq!(status(many.as_bytes()), 400);
        // Where in a list the bad element is.
        let r = parse(br#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/a"}, {"path": "/b", "iommu": true}]}"#)
            .expect_err("refused");
        assert!(
            r.body.as_deref().unwrap_or("").contains("disks[1]: iommu"),
            "{r:?}"
        );
    }
}
