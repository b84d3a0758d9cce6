//! A VMM started with `--api-socket` and no `--kernel` / `--firmware`: it waits for
//! `vm.create` and `vm.boot`, in the order Kata Containers' Cloud Hypervisor driver uses
//! (vmm.ping, vm.create, vm.info, vm.add-net, vm.boot, ...). See docs/api.md.
//!
//! `vm.create`'s body arrives in command-line form ([`VmSpec`]) and is checked by the command
//! line's own parser against the VMM's command line: a VM created here is checked exactly as
//! one started with `--kernel`. Until `vm.boot`, `vm.add-disk` and `vm.add-net` add to the
//! configuration (cold-plugged: the devices start at boot in their slots), `vm.remove-device`
//! takes out of it, `vm.info` shows it with the state `Created`. A request that fails changes
//! nothing.

use std::sync::mpsc::Receiver;

use log::{debug, info};

use crate::api::vm_config::VmSpec;
use crate::config::{Args, ConfigError, VmConfig};
use crate::control::{PlugRequest, Reply, ReplySender, Request, RequestError};
use crate::vcpu::Event;
use crate::vm::Outcome;

/// What ended the wait.
#[derive(Debug)]
pub enum Waited {
    /// `vm.boot`: boot this VM, then answer the caller.
    Boot(Box<VmConfig>, ReplySender),
    /// A signal or `vmm.shutdown` before the VM was booted.
    Exit(Outcome),
}

/// An error's message with its causes, for an API answer.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// The VM between `vm.create` and `vm.boot`.
#[derive(Debug, Default)]
pub struct Pending {
    created: Option<VmConfig>,
}

/// Why a request cannot be answered before boot.
fn not_booted(created: bool) -> RequestError {
    RequestError::new(
        409,
        if created {
            "the VM is created, not booted (vm.boot)"
        } else {
            "there is no VM yet (vm.create, then vm.boot)"
        },
    )
}

/// A device the configuration refused: a file that does not open is bad input (400); the
/// options themselves were checked by the API, so the rest is a conflict with the VM (a
/// duplicate id, no free slot: 409, as for a hot-plug).
fn device_error(e: &ConfigError) -> RequestError {
    let status = match e {
        ConfigError::Option { .. } => 409,
        _ => 400,
    };
    RequestError::new(status, chain(e))
}

impl Pending {
    /// Answers one request before boot; `None` for `vm.boot` of a created VM, which the
    /// caller boots.
    pub fn answer(&mut self, base: &Args, request: Request) -> Option<Result<Reply, RequestError>> {
        let created = self.created.is_some();
        Some(match request {
            Request::Create(spec) => self.create(base, &spec),
            Request::Boot if created => return None,
            Request::Info => match &self.created {
                Some(c) => Ok(Reply::Info(
                    serde_json::json!({
                        "config": crate::vm::config_json(c),
                        "state": "Created",
                        "memory_actual_size": c.ram_size,
                        "devices": [],
                    })
                    .to_string(),
                )),
                None => Err(not_booted(false)),
            },
            Request::Plug(plug) => match &mut self.created {
                None => Err(not_booted(false)),
                Some(c) => {
                    let (what, added) = match plug {
                        PlugRequest::Disk(d) => ("disk", c.add_disk(d)),
                        PlugRequest::Net(n) => ("network interface", c.add_net(n)),
                    };
                    added
                        .map(|()| {
                            info!("{what} added to the VM before boot (cold-plugged)");
                            // Cloud Hypervisor answers a device added before boot with 204.
                            Reply::Done
                        })
                        .map_err(|e| device_error(&e))
                }
            },
            Request::Unplug { id } => match &mut self.created {
                None => Err(not_booted(false)),
                Some(c) => {
                    if c.remove_device(&id) {
                        info!("device {id} removed from the VM before boot");
                        Ok(Reply::Done)
                    } else {
                        Err(RequestError::new(
                            404,
                            format!("no disk or network interface {id:?} in the VM"),
                        ))
                    }
                }
            },
            // SIGWINCH with nothing to resize yet.
            Request::ResizeConsole { size: None } => Ok(Reply::Done),
            _ => Err(not_booted(created)),
        })
    }

    fn create(&mut self, base: &Args, spec: &VmSpec) -> Result<Reply, RequestError> {
        if self.created.is_some() {
            return Err(RequestError::new(
                409,
                "the VM is already created (one VM per VMM; vm.delete is not served)",
            ));
        }
        let config =
            VmConfig::try_from(spec.apply(base)).map_err(|e| RequestError::new(400, chain(&e)))?;
        info!(
            "VM created through the API ({} vCPUs, {} MiB, {} disks, {} network interfaces); waiting for vm.boot",
            config.vcpus,
            config.ram_size >> 20,
            config.disks.len(),
            config.nets.len()
        );
        self.created = Some(config);
        Ok(Reply::Done)
    }

    /// The configuration `vm.boot` boots.
    fn take(&mut self) -> Option<VmConfig> {
        self.created.take()
    }
}

/// Serves the requests that arrive before `vm.boot` (with `base`, the VMM's command line)
/// until one boots the VM or ends the VMM.
pub fn wait(base: &Args, events: &Receiver<Event>) -> Waited {
    info!("no --kernel or --firmware: waiting for vm.create and vm.boot on the API socket");
    let mut pending = Pending::default();
    loop {
        let Ok(event) = events.recv() else {
            // Every sender is gone: nothing can ask for anything any more.
            return Waited::Exit(Outcome::Signal(libc::SIGTERM));
        };
        let (request, reply) = match event {
            Event::Signal(sig) => return Waited::Exit(Outcome::Signal(sig)),
            Event::Control(request, reply) => (request, reply),
            other => {
                debug!("before boot, ignoring {other:?}");
                continue;
            }
        };
        if matches!(request, Request::Shutdown) {
            info!("shutdown asked through the API before boot");
            drop(reply.send(Ok(Reply::Done)));
            return Waited::Exit(Outcome::Signal(libc::SIGTERM));
        }
        debug!("before boot: {request:?}");
        match pending.answer(base, request) {
            Some(answer) => drop(reply.send(answer)),
            None => {
                let config = pending
                    .take()
                    .expect("answer hands back vm.boot only once created");
                return Waited::Boot(Box::new(config), reply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A file that passes for an arm64 Image (the header's magic at 0x38).
    fn fake_kernel(dir: &std::path::Path) -> std::path::PathBuf {
        let mut image = vec![0u8; 64 << 10];
        image[0x38..0x3c].copy_from_slice(b"ARM\x64");
        // text_offset 0, image_size 64 KiB, flags: little endian, 4K pages, anywhere.
        image[0x10..0x18].copy_from_slice(&(64u64 << 10).to_le_bytes());
        image[0x18..0x20].copy_from_slice(&0xau64.to_le_bytes());
        let path = dir.join("Image");
        std::fs::write(&path, image).expect("write kernel");
        path
    }

    fn answer(p: &mut Pending, base: &Args, r: Request) -> Result<Reply, RequestError> {
        p.answer(base, r).expect("not a boot")
    }

    #[test]
    fn test_create_kata_order_before_boot() {
        let dir = std::env::temp_dir().join(format!("bulkhead-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let kernel = fake_kernel(&dir);
        let image = dir.join("d0");
        std::fs::write(&image, vec![0u8; 1 << 20]).expect("disk");
        let base =
            Args::try_parse_from(["bulkhead", "--api-socket", "/tmp/x.sock", "--serial", "off"])
                .expect("parses");
        let mut p = Pending::default();

        // Before vm.create: info, boot, plugs are 409.
        assert_eq!(
            answer(&mut p, &base, Request::Info)
                .map(|_| ())
                .expect_err("409")
                .status,
            409
        );
        assert!(matches!(
            p.answer(&base, Request::Boot),
            Some(Err(RequestError { status: 409, .. }))
        ));
        assert_eq!(
            answer(&mut p, &base, Request::PowerButton)
                .expect_err("409")
                .status,
            409
        );

        // A bad create (a kernel that is not there) changes nothing.
        let bad = crate::api::vm_config::parse(br#"{"payload": {"kernel": "/nonexistent/Image"}}"#)
            .expect("body parses");
        let e = answer(&mut p, &base, Request::Create(Box::new(bad))).expect_err("400");
        assert_eq!(e.status, 400);
        assert!(e.message.contains("/nonexistent/Image"), "{}", e.message);
        assert!(p.created.is_none());

        let body = format!(
            r#"{{"cpus": {{"boot_vcpus": 2}}, "memory": {{"size": 268435456}},
                "payload": {{"kernel": "{}", "cmdline": "console=ttyAMA0 quiet"}},
                "pci_slots": 3}}"#,
            kernel.display()
        );
        let spec = crate::api::vm_config::parse(body.as_bytes()).expect("body parses");
        assert!(matches!(
            answer(&mut p, &base, Request::Create(Box::new(spec.clone()))),
            Ok(Reply::Done)
        ));
        let e = answer(&mut p, &base, Request::Create(Box::new(spec))).expect_err("409");
        assert_eq!(e.status, 409);

        match answer(&mut p, &base, Request::Info) {
            Ok(Reply::Info(doc)) => {
                let v: serde_json::Value = serde_json::from_str(&doc).expect("json");
                assert_eq!(v["state"], "Created");
                assert_eq!(v["config"]["cpus"]["boot_vcpus"], 2);
                assert_eq!(v["config"]["memory"]["size"], 268_435_456u64);
                assert_eq!(v["config"]["pci_slots"], 3);
            }
            r => panic!("{r:?}"),
        }

        // vm.add-net / vm.add-disk before boot: cold-plugged, 204; a duplicate id is 409,
        // an image that does not open 400, one too many for the slots 409.
        let net = |body: &[u8]| match crate::api::routes::route("PUT", "/api/v1/vm.add-net", body) {
            crate::api::routes::Action::Control { request, .. } => request,
            a => panic!("{a:?}"),
        };
        let disk = |body: &str| match crate::api::routes::route(
            "PUT",
            "/api/v1/vm.add-disk",
            body.as_bytes(),
        ) {
            crate::api::routes::Action::Control { request, .. } => request,
            a => panic!("{a:?}"),
        };
        assert!(matches!(
            answer(&mut p, &base, net(br#"{"tap": "tap0", "id": "eth0"}"#)),
            Ok(Reply::Done)
        ));
        assert_eq!(
            answer(&mut p, &base, net(br#"{"tap": "tap1", "id": "eth0"}"#))
                .expect_err("dup")
                .status,
            409
        );
        let missing = format!(r#"{{"path": "{}/nope", "id": "d9"}}"#, dir.display());
        assert_eq!(
            answer(&mut p, &base, disk(&missing))
                .expect_err("missing")
                .status,
            400
        );
        let d0 = format!(r#"{{"path": "{}", "id": "data"}}"#, image.display());
        assert!(matches!(answer(&mut p, &base, disk(&d0)), Ok(Reply::Done)));
        let d1 = format!(
            r#"{{"path": "{}", "id": "data2", "readonly": true}}"#,
            image.display()
        );
        assert!(matches!(answer(&mut p, &base, disk(&d1)), Ok(Reply::Done)));
        let d2 = format!(
            r#"{{"path": "{}", "id": "data3", "readonly": true}}"#,
            image.display()
        );
        let e = answer(&mut p, &base, disk(&d2)).expect_err("full");
        assert_eq!(e.status, 409, "{}", e.message);
        {
            let c = p.created.as_ref().expect("created");
            assert_eq!((c.disks.len(), c.nets.len()), (2, 1));
        }
        // vm.remove-device before boot.
        assert!(matches!(
            answer(&mut p, &base, Request::Unplug { id: "data2".into() }),
            Ok(Reply::Done)
        ));
        assert_eq!(
            answer(&mut p, &base, Request::Unplug { id: "data2".into() })
                .expect_err("404")
                .status,
            404
        );
        assert_eq!(p.created.as_ref().map(|c| c.disks.len()), Some(1));

        // vm.boot hands the configuration back.
        assert!(p.answer(&base, Request::Boot).is_none());
        let c = p.take().expect("created");
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.disks[0].id.as_deref(), Some("data"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
