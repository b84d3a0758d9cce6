//! The endpoints: which request each (method, path, body) is, in Cloud Hypervisor's names, and
//! the JSON bodies of `vm.add-disk` / `vm.add-net` mapped onto Bulkhead's `--disk` / `--net`
//! configuration. Everything here is pure (no I/O): it runs in the API threads, which may open
//! nothing, and a request it refuses changes nothing.

use std::time::Duration;

use serde::Deserialize;

use super::http::HttpResponse;
use crate::config::{ConfigError, DiskConfig, NetConfig};
use crate::control::{PlugRequest, Reply, Request, RequestError, UnplugOutcome};

/// The API's root.
pub const ROOT: &str = "/api/v1/";

/// How long the API waits for the VM to answer an info, shutdown or reboot request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it waits for a fault to be injected: the device's control deadline, and margin.
pub const INJECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it waits for a plug (spawn, jail, handshake, slot) to be answered.
pub const PLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// How long it waits for `vm.boot`: guest RAM, and every device process started and
/// connected, as for plugs.
pub const BOOT_TIMEOUT: Duration = PLUG_TIMEOUT;
/// How long it waits for an unplug: the guest's 5 s attention-button window, the surprise
/// removal after it, and margin.
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(15);

/// What to do with a request.
#[derive(Debug)]
pub enum Action {
    /// Answer this at once.
    Respond(HttpResponse),
    /// Ask the VM, wait at most `timeout` for its answer.
    Control {
        /// The request.
        request: Request,
        /// The bound on the wait.
        timeout: Duration,
    },
}

/// Endpoints Cloud Hypervisor has that Bulkhead does not serve (yet): answered 501 with a
/// message saying so, rather than 404 as for a name nobody knows.
const NOT_IMPLEMENTED: [&str; 10] = [
    "vmm.info",
    "vm.delete",
    "vm.resize-zone",
    "vm.add-device",
    "vm.add-fs",
    "vm.add-pmem",
    "vm.add-vsock",
    "vm.add-vdpa",
    "vm.snapshot",
    "vm.restore",
];

fn bad(message: impl Into<String>) -> HttpResponse {
    HttpResponse::error(400, message)
}

/// The method an endpoint takes; a request with another gets 400, as in Cloud Hypervisor.
fn expect_method(method: &str, want: &str, endpoint: &str) -> Result<(), HttpResponse> {
    if method == want {
        Ok(())
    } else {
        Err(bad(format!("{endpoint} takes {want}, not {method}")))
    }
}

/// Routes one request.
pub fn route(method: &str, path: &str, body: &[u8]) -> Action {
    match route_inner(method, path, body) {
        Ok(a) => a,
        Err(r) => Action::Respond(r),
    }
}

fn route_inner(method: &str, path: &str, body: &[u8]) -> Result<Action, HttpResponse> {
    let Some(endpoint) = path.strip_prefix(ROOT) else {
        return Err(HttpResponse::error(
            404,
            format!("{path}: not found (the API is under {ROOT})"),
        ));
    };
    let control = |request, timeout| Ok(Action::Control { request, timeout });
    match endpoint {
        "vmm.ping" => {
            expect_method(method, "GET", endpoint)?;
            Ok(Action::Respond(HttpResponse::json(200, ping_body())))
        }
        "vmm.shutdown" | "vm.shutdown" => {
            expect_method(method, "PUT", endpoint)?;
            control(Request::Shutdown, REPLY_TIMEOUT)
        }
        "vm.reboot" => {
            expect_method(method, "PUT", endpoint)?;
            control(Request::Reboot, REPLY_TIMEOUT)
        }
        "vm.info" => {
            expect_method(method, "GET", endpoint)?;
            control(Request::Info, REPLY_TIMEOUT)
        }
        "vm.create" => {
            expect_method(method, "PUT", endpoint)?;
            let spec = super::vm_config::parse(body)?;
            control(Request::Create(Box::new(spec)), REPLY_TIMEOUT)
        }
        "vm.boot" => {
            expect_method(method, "PUT", endpoint)?;
            control(Request::Boot, BOOT_TIMEOUT)
        }
        "vm.add-disk" => {
            expect_method(method, "PUT", endpoint)?;
            let disk = disk_config(body)?;
            control(Request::Plug(PlugRequest::Disk(disk)), PLUG_TIMEOUT)
        }
        "vm.add-net" => {
            expect_method(method, "PUT", endpoint)?;
            let net = net_config(body)?;
            control(Request::Plug(PlugRequest::Net(net)), PLUG_TIMEOUT)
        }
        "vm.remove-device" => {
            expect_method(method, "PUT", endpoint)?;
            let RemoveDevice { id } = json::<RemoveDevice>(body)?;
            if !crate::config::valid_device_id(&id) {
                return Err(bad(format!("id {id:?}: not a device id")));
            }
            control(Request::Unplug { id }, UNPLUG_TIMEOUT)
        }
        "vm.resize" => {
            expect_method(method, "PUT", endpoint)?;
            let resize = json::<Resize>(body)?;
            if resize.desired_vcpus.is_some() || resize.desired_ram.is_some() {
                return Err(HttpResponse::error(
                    501,
                    "vm.resize: only desired_balloon is implemented by Bulkhead (no vCPU or RAM hot-plug)",
                ));
            }
            let desired_balloon = resize
                .desired_balloon
                .ok_or_else(|| bad("vm.resize needs desired_balloon (bytes)"))?;
            if desired_balloon % 4096 != 0 {
                return Err(bad(format!(
                    "desired_balloon {desired_balloon} is not a multiple of 4096 (the balloon's page)"
                )));
            }
            control(Request::ResizeBalloon { desired_balloon }, REPLY_TIMEOUT)
        }
        "vm.balloon-statistics" => {
            expect_method(method, "GET", endpoint)?;
            control(Request::BalloonStatistics, REPLY_TIMEOUT)
        }
        "vm.resize-console" => {
            expect_method(method, "PUT", endpoint)?;
            let ResizeConsole { cols, rows } = json::<ResizeConsole>(body)?;
            control(
                Request::ResizeConsole {
                    size: Some((cols, rows)),
                },
                REPLY_TIMEOUT,
            )
        }
        "vm.pause" => {
            expect_method(method, "PUT", endpoint)?;
            control(Request::Pause, REPLY_TIMEOUT)
        }
        "vm.resume" => {
            expect_method(method, "PUT", endpoint)?;
            control(Request::Resume, REPLY_TIMEOUT)
        }
        "vm.power-button" => {
            expect_method(method, "PUT", endpoint)?;
            control(Request::PowerButton, REPLY_TIMEOUT)
        }
        "vm.counters" => {
            expect_method(method, "GET", endpoint)?;
            control(Request::Counters, REPLY_TIMEOUT)
        }
        "vm.inject-fault" => {
            expect_method(method, "PUT", endpoint)?;
            let InjectFault { id, fault } = json::<InjectFault>(body)?;
            if !crate::config::valid_device_id(&id) {
                return Err(bad(format!("id {id:?}: not a device id")));
            }
            crate::config::check_fault(&fault, false).map_err(bad)?;
            control(Request::InjectFault { id, fault }, INJECT_TIMEOUT)
        }
        e if NOT_IMPLEMENTED.contains(&e) => Err(HttpResponse::error(
            501,
            format!("{e} is not implemented by Bulkhead (docs/api.md lists what is)"),
        )),
        _ => Err(HttpResponse::error(
            404,
            format!("{path}: no such endpoint (docs/api.md lists them)"),
        )),
    }
}

/// `vmm.ping`'s answer, in Cloud Hypervisor's fields.
fn ping_body() -> String {
    serde_json::json!({
        "build_version": env!("CARGO_PKG_VERSION"),
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "features": [],
    })
    .to_string()
}

/// The HTTP answer to the VM's reply.
pub fn reply_response(reply: Result<Reply, RequestError>) -> HttpResponse {
    match reply {
        Ok(Reply::Done) => HttpResponse::no_content(),
        Ok(Reply::Info(json)) => HttpResponse::json(200, json),
        Ok(Reply::Plugged { id, bdf }) => {
            HttpResponse::json(200, serde_json::json!({ "id": id, "bdf": bdf }).to_string())
        }
        Ok(Reply::Unplugged(outcome)) => HttpResponse::json(
            200,
            serde_json::json!({
                "removal": match outcome {
                    UnplugOutcome::Orderly => "orderly",
                    UnplugOutcome::Surprise => "surprise",
                }
            })
            .to_string(),
        ),
        Err(e) => HttpResponse::error(e.status, e.message),
    }
}

/// Parses a JSON body; unknown fields are ignored (Cloud Hypervisor's clients send many).
fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, HttpResponse> {
    if body.is_empty() {
        return Err(bad("this endpoint needs a JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("bad JSON body: {e}")))
}

/// Cloud Hypervisor's `VmResizeData`: only `desired_balloon` is served.
#[derive(Deserialize)]
struct Resize {
    #[serde(default)]
    desired_vcpus: Option<u64>,
    #[serde(default)]
    desired_ram: Option<u64>,
    #[serde(default)]
    desired_balloon: Option<u64>,
}

#[derive(Deserialize)]
struct RemoveDevice {
    id: String,
}

/// `vm.inject-fault`'s body (docs/fault-injection.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectFault {
    id: String,
    fault: String,
}

/// `vm.resize-console`'s body: the virtio console's columns and rows.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeConsole {
    cols: u16,
    rows: u16,
}

/// One token bucket (Cloud Hypervisor's `TokenBucketConfig`; refill time in ms).
#[derive(Deserialize)]
struct TokenBucket {
    size: u64,
    #[serde(default)]
    one_time_burst: Option<u64>,
    refill_time: u64,
}

/// Cloud Hypervisor's `RateLimiterConfig`.
#[derive(Deserialize)]
struct RateLimiterConfig {
    #[serde(default)]
    bandwidth: Option<TokenBucket>,
    #[serde(default)]
    ops: Option<TokenBucket>,
}

/// The fields of Cloud Hypervisor's `PciDeviceCommonConfig`.
#[derive(Deserialize)]
struct PciCommon {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    iommu: bool,
    #[serde(default)]
    pci_segment: u16,
    #[serde(default)]
    pci_device_id: Option<u8>,
}

/// Cloud Hypervisor's `DiskConfig`, the fields Bulkhead reads (others are ignored).
#[derive(Deserialize)]
struct DiskBody {
    #[serde(flatten)]
    pci: PciCommon,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    direct: bool,
    #[serde(default)]
    num_queues: Option<u64>,
    #[serde(default)]
    queue_size: Option<u64>,
    #[serde(default)]
    vhost_user: bool,
    #[serde(default)]
    vhost_socket: Option<String>,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default)]
    rate_limit_group: Option<String>,
    #[serde(default)]
    rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default)]
    queue_affinity: Option<serde_json::Value>,
    #[serde(default)]
    backing_files: bool,
    #[serde(default)]
    image_type: Option<String>,
    /// Bulkhead's own: the device process's memory budget (bytes) and task limit.
    #[serde(default)]
    memory_max: Option<u64>,
    #[serde(default)]
    pids_max: Option<u64>,
}

/// Cloud Hypervisor's `NetConfig`, the fields Bulkhead reads (others are ignored).
#[derive(Deserialize)]
struct NetBody {
    #[serde(flatten)]
    pci: PciCommon,
    #[serde(default)]
    tap: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    host_mac: Option<String>,
    #[serde(default)]
    mtu: Option<u16>,
    #[serde(default)]
    num_queues: Option<u64>,
    #[serde(default)]
    queue_size: Option<u64>,
    #[serde(default)]
    vhost_user: bool,
    #[serde(default)]
    vhost_socket: Option<String>,
    #[serde(default)]
    vhost_mode: Option<String>,
    #[serde(default)]
    fds: Option<serde_json::Value>,
    #[serde(default)]
    rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default = "yes")]
    offload_tso: bool,
    #[serde(default = "yes")]
    offload_ufo: bool,
    #[serde(default = "yes")]
    offload_csum: bool,
}

fn yes() -> bool {
    true
}

/// `key=value` pairs for the command line's option parser: refuses a value it could not
/// carry (a comma would start the next option).
struct Options(Vec<String>);

impl Options {
    fn push(&mut self, key: &str, value: impl std::fmt::Display) -> Result<(), HttpResponse> {
        let value = value.to_string();
        if value.contains(',') {
            return Err(bad(format!("{key} {value:?}: a ',' cannot be used here")));
        }
        self.0.push(format!("{key}={value}"));
        Ok(())
    }

    fn push_opt(
        &mut self,
        key: &str,
        value: Option<impl std::fmt::Display>,
    ) -> Result<(), HttpResponse> {
        match value {
            Some(v) => self.push(key, v),
            None => Ok(()),
        }
    }

    fn joined(&self) -> String {
        self.0.join(",")
    }
}

/// Refuses the PCI placement options Bulkhead has no use for.
fn check_pci(pci: &PciCommon) -> Result<(), HttpResponse> {
    if pci.iommu {
        return Err(bad("iommu: Bulkhead has no virtual IOMMU"));
    }
    if pci.pci_segment != 0 {
        return Err(bad("pci_segment: Bulkhead has one PCI segment, 0"));
    }
    if pci.pci_device_id.is_some() {
        return Err(bad(
            "pci_device_id: Bulkhead places a device in the first free slot",
        ));
    }
    Ok(())
}

fn rate_limits(o: &mut Options, r: &Option<RateLimiterConfig>) -> Result<(), HttpResponse> {
    let Some(r) = r else { return Ok(()) };
    for (prefix, bucket) in [("bw", &r.bandwidth), ("ops", &r.ops)] {
        if let Some(b) = bucket {
            o.push(&format!("{prefix}_size"), b.size)?;
            o.push_opt(&format!("{prefix}_one_time_burst"), b.one_time_burst)?;
            o.push(&format!("{prefix}_refill_time"), b.refill_time)?;
        }
    }
    Ok(())
}

fn config_error(e: ConfigError) -> HttpResponse {
    bad(e.to_string())
}

/// `vm.add-disk`'s body as the `--disk` options it means, checked by the same parser (with no
/// file opened here: the plug opens the image).
pub fn disk_options(body: &[u8]) -> Result<String, HttpResponse> {
    let d: DiskBody = json(body)?;
    check_pci(&d.pci)?;
    if d.rate_limit_group.is_some() {
        return Err(bad(
            "rate_limit_group: Bulkhead limits each disk on its own (rate_limiter_config)",
        ));
    }
    if d.queue_affinity.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(bad("queue_affinity: not supported by Bulkhead"));
    }
    if d.backing_files {
        return Err(bad(
            "backing_files: Bulkhead serves raw images only, with no backing files",
        ));
    }
    if let Some(t) = &d.image_type {
        if !t.eq_ignore_ascii_case("raw") && !t.eq_ignore_ascii_case("unknown") {
            return Err(bad(format!(
                "image_type {t:?}: Bulkhead serves raw images only"
            )));
        }
    }
    let mut o = Options(Vec::new());
    match (d.vhost_user, &d.vhost_socket, &d.path) {
        (true, Some(socket), None) => o.push("socket", socket)?,
        (true, None, _) => return Err(bad("vhost_user needs vhost_socket")),
        (false, Some(_), _) => return Err(bad("vhost_socket needs vhost_user: true")),
        (true, Some(_), Some(_)) => return Err(bad("give path or vhost_socket, not both")),
        (false, None, Some(path)) => o.push("path", path)?,
        (false, None, None) => {
            return Err(bad("path (or vhost_user with vhost_socket) is required"))
        }
    }
    if d.readonly {
        o.push("readonly", "on")?;
    }
    if d.direct {
        o.push("direct", "on")?;
    }
    o.push_opt("num_queues", d.num_queues)?;
    o.push_opt("queue_size", d.queue_size)?;
    o.push_opt("id", d.pci.id.as_ref())?;
    o.push_opt("serial", d.serial.as_ref())?;
    o.push_opt("memory_max", d.memory_max)?;
    o.push_opt("pids_max", d.pids_max)?;
    rate_limits(&mut o, &d.rate_limiter_config)?;
    Ok(o.joined())
}

fn disk_config(body: &[u8]) -> Result<DiskConfig, HttpResponse> {
    crate::config::parse_disk_options(&disk_options(body)?).map_err(config_error)
}

/// `vm.add-net`'s body as the `--net` options it means.
pub fn net_options(body: &[u8]) -> Result<String, HttpResponse> {
    let n: NetBody = json(body)?;
    check_pci(&n.pci)?;
    if n.fds.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "fds: tap descriptors passed with the request (SCM_RIGHTS) are not supported yet; give tap",
        ));
    }
    if n.host_mac.is_some() {
        return Err(bad("host_mac: Bulkhead leaves the tap's own MAC address"));
    }
    if !(n.offload_tso && n.offload_ufo && n.offload_csum) {
        return Err(bad(
            "offload_tso, offload_ufo, offload_csum: Bulkhead cannot turn offloads off",
        ));
    }
    if let Some(m) = &n.vhost_mode {
        if !m.eq_ignore_ascii_case("client") {
            return Err(bad(format!(
                "vhost_mode {m:?}: Bulkhead connects to the backend (client) only"
            )));
        }
    }
    let mut o = Options(Vec::new());
    match (n.vhost_user, &n.vhost_socket, &n.tap) {
        (true, Some(socket), None) => o.push("socket", socket)?,
        (true, None, _) => return Err(bad("vhost_user needs vhost_socket")),
        (false, Some(_), _) => return Err(bad("vhost_socket needs vhost_user: true")),
        (true, Some(_), Some(_)) => return Err(bad("give tap or vhost_socket, not both")),
        (false, None, Some(tap)) => o.push("tap", tap)?,
        (false, None, None) => {
            return Err(bad(
                "tap is required (Bulkhead does not name a tap for you), or vhost_user with vhost_socket",
            ))
        }
    }
    o.push_opt("ip", n.ip.as_ref())?;
    o.push_opt("mask", n.mask.as_ref())?;
    o.push_opt("mac", n.mac.as_ref())?;
    o.push_opt("mtu", n.mtu)?;
    o.push_opt("num_queues", n.num_queues)?;
    o.push_opt("queue_size", n.queue_size)?;
    o.push_opt("id", n.pci.id.as_ref())?;
    rate_limits(&mut o, &n.rate_limiter_config)?;
    Ok(o.joined())
}

/// Names an interface added without `id` for its default MAC address (the plug names the
/// device itself): a different name, so a different MAC, for each such interface.
static UNNAMED_NETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn net_config(body: &[u8]) -> Result<NetConfig, HttpResponse> {
    let options = net_options(body)?;
    // parse_net names an interface without id= `net<index>`; an added one gets an index past
    // any the command line can give (--pci-slots is at most 31).
    let index = 1000 + UNNAMED_NETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::config::parse_net(&options, index).map_err(config_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskBackend, NetBackend};

    fn status(a: Action) -> u16 {
        match a {
            Action::Respond(r) => r.status,
            Action::Control { request, .. } => panic!("expected a response, got {request:?}"),
        }
    }

    fn request(a: Action) -> Request {
        match a {
            Action::Control { request, .. } => request,
            Action::Respond(r) => panic!("expected a request, got {r:?}"),
        }
    }

    #[test]
    fn test_routes_endpoints_and_methods() {
        assert_eq!(status(route("GET", "/api/v1/vmm.ping", b"")), 200);
        assert!(matches!(
            request(route("GET", "/api/v1/vm.info", b"")),
            Request::Info
        ));
        assert!(matches!(
            request(route("PUT", "/api/v1/vm.reboot", b"")),
            Request::Reboot
        ));
        for p in ["/api/v1/vm.shutdown", "/api/v1/vmm.shutdown"] {
            assert!(matches!(request(route("PUT", p, b"")), Request::Shutdown));
        }
        match request(route(
            "PUT",
            "/api/v1/vm.remove-device",
            br#"{"id":"disk1"}"#,
        )) {
            Request::Unplug { id } => assert_eq!(id, "disk1"),
            r => panic!("{r:?}"),
        }
        // Wrong method: 400 as in Cloud Hypervisor; unknown: 404; known elsewhere: 501.
        assert_eq!(status(route("PUT", "/api/v1/vmm.ping", b"")), 400);
        assert_eq!(status(route("GET", "/api/v1/vm.reboot", b"")), 400);
        assert_eq!(status(route("DELETE", "/api/v1/vm.info", b"")), 400);
        assert_eq!(status(route("GET", "/api/v1/vm.nope", b"")), 404);
        assert_eq!(status(route("GET", "/vm.info", b"")), 404);
        assert_eq!(status(route("GET", "/api/v2/vm.info", b"")), 404);
        assert!(matches!(
            request(route("PUT", "/api/v1/vm.power-button", b"")),
            Request::PowerButton
        ));
        assert_eq!(status(route("GET", "/api/v1/vm.power-button", b"")), 400);
        assert!(matches!(
            request(route("PUT", "/api/v1/vm.pause", b"")),
            Request::Pause
        ));
        assert!(matches!(
            request(route("PUT", "/api/v1/vm.resume", b"")),
            Request::Resume
        ));
        assert_eq!(status(route("GET", "/api/v1/vm.pause", b"")), 400);
        assert_eq!(status(route("PUT", "/api/v1/vm.create", b"{}")), 400);
        assert_eq!(status(route("GET", "/api/v1/vm.create", b"")), 400);
        match request(route(
            "PUT",
            "/api/v1/vm.create",
            br#"{"payload": {"kernel": "/k"}}"#,
        )) {
            Request::Create(spec) => assert_eq!(spec.kernel, Some("/k".into())),
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            request(route("PUT", "/api/v1/vm.boot", b"")),
            Request::Boot
        ));
        assert_eq!(status(route("GET", "/api/v1/vm.boot", b"")), 400);
        assert_eq!(status(route("PUT", "/api/v1/vm.delete", b"")), 501);
        assert!(matches!(
            request(route("GET", "/api/v1/vm.counters", b"")),
            Request::Counters
        ));
        assert_eq!(status(route("PUT", "/api/v1/vm.counters", b"")), 400);
    }

    #[test]
    fn test_routes_balloon_resize_and_statistics() {
        match request(route(
            "PUT",
            "/api/v1/vm.resize",
            br#"{"desired_balloon":536870912}"#,
        )) {
            Request::ResizeBalloon { desired_balloon } => assert_eq!(desired_balloon, 512 << 20),
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            request(route("GET", "/api/v1/vm.balloon-statistics", b"")),
            Request::BalloonStatistics
        ));
        for (body, want) in [
            (&br#"{"desired_balloon":100}"#[..], 400),
            (br#"{"desired_balloon":-1}"#, 400),
            (br#"{}"#, 400),
            (b"", 400),
            (br#"{"desired_vcpus":2}"#, 501),
            (br#"{"desired_ram":1073741824,"desired_balloon":0}"#, 501),
        ] {
            assert_eq!(
                status(route("PUT", "/api/v1/vm.resize", body)),
                want,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(status(route("GET", "/api/v1/vm.resize", b"")), 400);
        assert_eq!(
            status(route("PUT", "/api/v1/vm.balloon-statistics", b"")),
            400
        );
    }

    #[test]
    fn test_routes_bad_json_bodies() {
        for (path, body) in [
            ("vm.remove-device", &b""[..]),
            ("vm.remove-device", b"{"),
            ("vm.remove-device", b"[]"),
            ("vm.remove-device", br#"{"id": 3}"#),
            ("vm.remove-device", br#"{"di": "x"}"#),
            ("vm.remove-device", br#"{"id": "a,b"}"#),
            ("vm.remove-device", br#"{"id": ""}"#),
            ("vm.add-disk", b"null"),
            ("vm.add-disk", b"{}"),
            ("vm.add-disk", br#"{"path": 7}"#),
            ("vm.add-disk", br#"{"path": "/a", "num_queues": 0}"#),
            ("vm.add-disk", br#"{"path": "/a", "num_queues": 99}"#),
            ("vm.add-disk", br#"{"path": "/a", "queue_size": 100}"#),
            ("vm.add-disk", br#"{"path": "/a,readonly=on"}"#),
            ("vm.add-disk", br#"{"path": "/a", "id": "bad id"}"#),
            ("vm.add-disk", br#"{"path": "/a", "iommu": true}"#),
            ("vm.add-disk", br#"{"path": "/a", "pci_segment": 1}"#),
            ("vm.add-disk", br#"{"path": "/a", "rate_limit_group": "g"}"#),
            ("vm.add-disk", br#"{"path": "/a", "image_type": "Qcow2"}"#),
            ("vm.add-disk", br#"{"path": "/a", "vhost_socket": "/s"}"#),
            ("vm.add-disk", br#"{"vhost_user": true}"#),
            ("vm.add-disk", br#"{"vhost_user": true, "vhost_socket": "/s", "readonly": true}"#),
            (
                "vm.add-disk",
                br#"{"path": "/a", "rate_limiter_config": {"bandwidth": {"size": 0, "refill_time": 100}}}"#,
            ),
            ("vm.add-net", b"{}"),
            ("vm.add-net", br#"{"tap": "tap0", "mac": "01:00:00:00:00:01"}"#),
            ("vm.add-net", br#"{"tap": "tap0", "num_queues": 3}"#),
            ("vm.add-net", br#"{"tap": "tap0", "ip": "10.0.0.1"}"#),
            ("vm.add-net", br#"{"tap": "tap0", "fds": [3]}"#),
            ("vm.add-net", br#"{"tap": "tap0", "host_mac": "52:54:00:00:00:01"}"#),
            ("vm.add-net", br#"{"tap": "tap0", "offload_tso": false}"#),
            ("vm.add-net", br#"{"tap": "tap0", "vhost_mode": "Server"}"#),
            ("vm.add-net", br#"{"tap": "no/slash"}"#),
            ("vm.add-net", br#"{"tap": "tap0", "mtu": 70000}"#),
        ] {
            let got = status(route("PUT", &format!("{ROOT}{path}"), body));
            assert_eq!(got, 400, "{path} {}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn test_routes_resize_console() {
        match request(route(
            "PUT",
            "/api/v1/vm.resize-console",
            br#"{"cols": 132, "rows": 43}"#,
        )) {
            Request::ResizeConsole { size } => assert_eq!(size, Some((132, 43))),
            r => panic!("{r:?}"),
        }
        for body in [
            &b""[..],
            br#"{"cols": 80}"#,
            br#"{"cols": 80, "rows": -1}"#,
            br#"{"cols": 70000, "rows": 24}"#,
            br#"{"cols": 80, "rows": 24, "x": 1}"#,
        ] {
            let got = status(route("PUT", "/api/v1/vm.resize-console", body));
            assert_eq!(got, 400, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(status(route("GET", "/api/v1/vm.resize-console", b"")), 400);
    }

    #[test]
    fn test_routes_inject_fault() {
        for (body, want) in [
            (
                &br#"{"id": "disk0", "fault": "eio=100-199"}"#[..],
                "eio=100-199",
            ),
            (br#"{"id": "disk0", "fault": "hang"}"#, "hang"),
            (br#"{"id": "net0", "fault": "crash"}"#, "crash"),
            (br#"{"id": "disk1", "fault": "delay_ms=20"}"#, "delay_ms=20"),
        ] {
            match request(route("PUT", "/api/v1/vm.inject-fault", body)) {
                Request::InjectFault { id, fault } => {
                    assert!(id.starts_with("disk") || id == "net0");
                    assert_eq!(fault, want);
                }
                r => panic!("{r:?}"),
            }
        }
        for body in [
            &b""[..],
            br#"{"id": "disk0"}"#,
            br#"{"id": "disk0", "fault": "melt"}"#,
            br#"{"id": "disk0", "fault": "eio=9-3"}"#,
            br#"{"id": "disk0", "fault": "eio=0"}"#,
            br#"{"id": "disk0", "fault": "delay_ms=60001"}"#,
            br#"{"id": "disk0", "fault": "crash\nfault seccomp"}"#,
            br#"{"id": "../x", "fault": "crash"}"#,
            br#"{"id": "disk0", "fault": "crash", "x": 1}"#,
        ] {
            let got = status(route("PUT", "/api/v1/vm.inject-fault", body));
            assert_eq!(got, 400, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(status(route("GET", "/api/v1/vm.inject-fault", b"")), 400);
    }

    #[test]
    fn test_routes_add_disk_maps_ch_fields() {
        let body = br#"{"path": "/img", "readonly": true, "direct": true, "num_queues": 2,
            "queue_size": 128, "id": "data", "serial": "SN1", "vhost_user": false,
            "unknown_field": {"ignored": 1}, "sparse": true, "iommu": false,
            "rate_limiter_config": {"bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 100},
                                    "ops": {"size": 10, "refill_time": 1000}}}"#;
        assert_eq!(
            disk_options(body).expect("valid"),
            "path=/img,readonly=on,direct=on,num_queues=2,queue_size=128,id=data,serial=SN1,\
             bw_size=1000,bw_one_time_burst=0,bw_refill_time=100,ops_size=10,ops_refill_time=1000"
        );
        match request(route("PUT", "/api/v1/vm.add-disk", body)) {
            Request::Plug(PlugRequest::Disk(d)) => {
                assert_eq!(d.id.as_deref(), Some("data"));
                assert_eq!((d.num_queues, d.queue_size), (2, 128));
                match d.backend {
                    DiskBackend::Process {
                        readonly,
                        direct,
                        rate_limit,
                        ..
                    } => {
                        assert!(readonly && direct);
                        assert_eq!(rate_limit.len(), 5);
                    }
                    b => panic!("{b:?}"),
                }
            }
            r => panic!("{r:?}"),
        }
        let socket = br#"{"vhost_user": true, "vhost_socket": "/run/blk.sock", "num_queues": 1}"#;
        match request(route("PUT", "/api/v1/vm.add-disk", socket)) {
            Request::Plug(PlugRequest::Disk(d)) => {
                assert_eq!(d.backend, DiskBackend::Socket("/run/blk.sock".into()))
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn test_routes_add_net_maps_ch_fields() {
        let body = br#"{"tap": "tap1", "ip": "192.168.249.1", "mask": "255.255.255.0",
            "mac": "52:54:00:12:34:56", "mtu": 1400, "num_queues": 4, "queue_size": 256,
            "id": "eth1", "vhost_mode": "Client", "fds": null, "offload_csum": true}"#;
        match request(route("PUT", "/api/v1/vm.add-net", body)) {
            Request::Plug(PlugRequest::Net(n)) => {
                assert_eq!(n.id.as_deref(), Some("eth1"));
                assert_eq!(n.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
                assert_eq!((n.mtu, n.num_queues, n.queue_size), (Some(1400), 4, 256));
                assert!(
                    matches!(n.backend, NetBackend::Tap { ref name, addr: Some(_) } if name == "tap1")
                );
            }
            r => panic!("{r:?}"),
        }
        // Two interfaces without id or mac get different default MACs.
        let macs: Vec<[u8; 6]> = (0..2)
            .map(
                |_| match request(route("PUT", "/api/v1/vm.add-net", br#"{"tap": "t"}"#)) {
                    Request::Plug(PlugRequest::Net(n)) => n.mac,
                    r => panic!("{r:?}"),
                },
            )
            .collect();
        assert_ne!(macs[0], macs[1]);
    }

    #[test]
    fn test_routes_reply_mapping() {
        assert_eq!(reply_response(Ok(Reply::Done)).status, 204);
        let r = reply_response(Ok(Reply::Plugged {
            id: "d".into(),
            bdf: "0000:01:00.0".into(),
        }));
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body.as_deref(),
            Some(r#"{"bdf":"0000:01:00.0","id":"d"}"#)
        );
        let r = reply_response(Err(RequestError::new(404, "no device \"x\"")));
        assert_eq!(r.status, 404);
        assert_eq!(r.body.as_deref(), Some(r#"["no device \"x\""]"#));
    }
}
