//! The flattened device tree that describes the machine to the guest.
//!
//! Modelled on QEMU `virt` (and what Firecracker and Cloud Hypervisor emit), so a mainline
//! arm64 kernel boots it with nothing on its command line but `console=ttyAMA0`.

use vm_fdt::{FdtWriter, FdtWriterResult};

use crate::layout::*;

/// Phandle of the interrupt controller.
const PHANDLE_GIC: u32 = 1;
/// Phandle of the ITS.
const PHANDLE_ITS: u32 = 2;
/// Phandle of the PL011's APB clock.
const PHANDLE_APB_PCLK: u32 = 3;
/// Phandle of the GICv2m MSI frame.
const PHANDLE_V2M: u32 = 4;
/// Phandle of the PL061 GPIO controller.
const PHANDLE_GPIO: u32 = 5;

/// `#interrupt-cells` values: interrupt types.
const GIC_FDT_IRQ_TYPE_SPI: u32 = 0;
const GIC_FDT_IRQ_TYPE_PPI: u32 = 1;
/// Trigger flags.
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
const IRQ_TYPE_LEVEL_LOW: u32 = 8;
/// A `gpios` specifier's flags cell: active high.
const GPIO_ACTIVE_HIGH: u32 = 0;
/// Linux's KEY_POWER input event code.
const KEY_POWER: u32 = 116;

/// Which GIC the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicKind {
    /// GICv3, with an ITS for MSIs when `its` is set.
    V3 {
        /// Whether an ITS is described.
        its: bool,
    },
    /// GICv2 (CPU interface, a GICv2m MSI frame).
    V2,
}

/// Everything the FDT describes that is not fixed by the memory map.
#[derive(Clone, Debug)]
pub struct FdtConfig<'a> {
    /// MPIDR_EL1 of each vCPU, boot CPU first.
    pub mpidrs: &'a [u64],
    /// Size of guest RAM.
    pub ram_size: u64,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Guest address and size of the initramfs.
    pub initramfs: Option<(u64, u64)>,
    /// Interrupt controller.
    pub gic: GicKind,
    /// Whether the PCIe host bridge is described.
    pub pcie: bool,
    /// Entropy handed to the guest (`/chosen/rng-seed` and `kaslr-seed`).
    pub rng_seed: [u8; 64],
    /// Whether the two CFI flash banks (UEFI code and variables, `--firmware`) are described.
    pub flash: bool,
}

/// Errors building the FDT.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// vm-fdt refused something.
    #[error("building the device tree")]
    Write(#[from] vm_fdt::Error),
    /// The blob is larger than the boot protocol allows.
    #[error("the device tree is {0} bytes, more than the 2 MiB the arm64 boot protocol allows")]
    TooLarge(usize),
}

/// Builds the device tree blob.
pub fn create_fdt(cfg: &FdtConfig) -> Result<Vec<u8>, FdtError> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_string("model", "Bulkhead")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    chosen(&mut fdt, cfg)?;
    memory(&mut fdt, cfg.ram_size)?;
    cpus(&mut fdt, cfg.mpidrs)?;
    psci(&mut fdt)?;
    gic(&mut fdt, cfg.gic, cfg.mpidrs.len() as u64)?;
    timer(&mut fdt, cfg.gic, cfg.mpidrs.len() as u32)?;
    apb_clock(&mut fdt)?;
    pl011(&mut fdt)?;
    pl031(&mut fdt)?;
    pl061(&mut fdt)?;
    if cfg.flash {
        flash(&mut fdt)?;
    }
    if cfg.pcie {
        pcie(&mut fdt, cfg.gic, cfg.flash)?;
    }

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooLarge(blob.len()));
    }
    Ok(blob)
}

fn chosen(fdt: &mut FdtWriter, cfg: &FdtConfig) -> FdtWriterResult<()> {
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cfg.cmdline)?;
    fdt.property_string("stdout-path", &format!("/pl011@{UART_START:x}"))?;
    if let Some((start, size)) = cfg.initramfs {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start + size)?;
    }
    fdt.property("rng-seed", &cfg.rng_seed)?;
    let mut kaslr = [0u8; 8];
    kaslr.copy_from_slice(&cfg.rng_seed[..8]);
    fdt.property_u64("kaslr-seed", u64::from_le_bytes(kaslr))?;
    fdt.end_node(node)
}

fn memory(fdt: &mut FdtWriter, ram_size: u64) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("memory@{RAM_START:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[RAM_START, ram_size])?;
    fdt.end_node(node)
}

fn cpus(fdt: &mut FdtWriter, mpidrs: &[u64]) -> FdtWriterResult<()> {
    let node = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for &mpidr in mpidrs {
        // The `reg` of an arm64 cpu node is MPIDR_EL1's affinity fields.
        let reg = mpidr & 0xff_00ff_ffff;
        let cpu = fdt.begin_node(&format!("cpu@{reg:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", reg)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(node)
}

fn psci(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    // KVM's in-kernel PSCI (0.2 and later) answers on HVC with the standard function IDs.
    let node = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(node)
}

fn gic(fdt: &mut FdtWriter, kind: GicKind, ncpus: u64) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_phandle(PHANDLE_GIC)?;
    match kind {
        GicKind::V3 { its } => {
            fdt.property_string("compatible", "arm,gic-v3")?;
            fdt.property_u32("#redistributor-regions", 1)?;
            fdt.property_array_u64(
                "reg",
                &[
                    GIC_DIST_START,
                    GIC_DIST_SIZE,
                    GIC_REDIST_START,
                    GIC_REDIST_SIZE_PER_CPU * ncpus,
                ],
            )?;
            fdt.property_array_u32(
                "interrupts",
                &[
                    GIC_FDT_IRQ_TYPE_PPI,
                    PPI_GIC_MAINTENANCE,
                    IRQ_TYPE_LEVEL_HIGH,
                ],
            )?;
            if its {
                let its = fdt.begin_node(&format!("msi-controller@{GIC_ITS_START:x}"))?;
                fdt.property_string("compatible", "arm,gic-v3-its")?;
                fdt.property_null("msi-controller")?;
                fdt.property_u32("#msi-cells", 1)?;
                fdt.property_array_u64("reg", &[GIC_ITS_START, GIC_ITS_SIZE])?;
                fdt.property_phandle(PHANDLE_ITS)?;
                fdt.end_node(its)?;
            }
        }
        GicKind::V2 => {
            fdt.property_string("compatible", "arm,cortex-a15-gic")?;
            fdt.property_array_u64(
                "reg",
                &[GIC_DIST_START, GIC_DIST_SIZE, GIC_CPU_START, GIC_CPU_SIZE],
            )?;
            // A GICv2 has no ITS: PCI devices' MSIs go through a GICv2m frame, which turns
            // them into SPIs (the VMM routes them to those SPIs directly).
            let v2m = fdt.begin_node(&format!("v2m@{GIC_V2M_START:x}"))?;
            fdt.property_string("compatible", "arm,gic-v2m-frame")?;
            fdt.property_null("msi-controller")?;
            fdt.property_array_u64("reg", &[GIC_V2M_START, GIC_V2M_SIZE])?;
            fdt.property_u32("arm,msi-base-spi", SPI_BASE + GIC_V2M_SPI_FIRST)?;
            fdt.property_u32("arm,msi-num-spis", GIC_V2M_SPI_COUNT)?;
            fdt.property_phandle(PHANDLE_V2M)?;
            fdt.end_node(v2m)?;
        }
    }
    fdt.end_node(node)
}

fn timer(fdt: &mut FdtWriter, kind: GicKind, ncpus: u32) -> FdtWriterResult<()> {
    // GICv2 PPI specifiers carry a mask of the CPUs the PPI is wired to.
    let flags = match kind {
        GicKind::V3 { .. } => IRQ_TYPE_LEVEL_LOW,
        GicKind::V2 => IRQ_TYPE_LEVEL_LOW | (((1u32 << ncpus.min(8)) - 1) << 8),
    };
    let node = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let mut cells = Vec::new();
    for ppi in [
        PPI_TIMER_SEC_PHYS,
        PPI_TIMER_PHYS,
        PPI_TIMER_VIRT,
        PPI_TIMER_HYP,
    ] {
        cells.extend_from_slice(&[GIC_FDT_IRQ_TYPE_PPI, ppi, flags]);
    }
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.end_node(node)
}

fn apb_clock(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", 24_000_000)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(PHANDLE_APB_PCLK)?;
    fdt.end_node(node)
}

fn pl011(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("pl011@{UART_START:x}"))?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[UART_START, UART_SIZE])?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_FDT_IRQ_TYPE_SPI, UART_SPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    fdt.property_array_u32("clocks", &[PHANDLE_APB_PCLK, PHANDLE_APB_PCLK])?;
    fdt.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
    fdt.end_node(node)
}

fn pl031(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("pl031@{RTC_START:x}"))?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl031".into(), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[RTC_START, RTC_SIZE])?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_FDT_IRQ_TYPE_SPI, RTC_SPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    fdt.property_u32("clocks", PHANDLE_APB_PCLK)?;
    fdt.property_string("clock-names", "apb_pclk")?;
    fdt.end_node(node)
}

/// The PL061 GPIO controller and, as on QEMU `virt`, a `gpio-keys` node whose `poweroff` key
/// is its line 3 (`vm.power-button`).
fn pl061(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("pl061@{GPIO_START:x}"))?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl061".into(), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[GPIO_START, GPIO_SIZE])?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_FDT_IRQ_TYPE_SPI, GPIO_SPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    fdt.property_u32("#gpio-cells", 2)?;
    fdt.property_null("gpio-controller")?;
    fdt.property_u32("clocks", PHANDLE_APB_PCLK)?;
    fdt.property_string("clock-names", "apb_pclk")?;
    fdt.property_phandle(PHANDLE_GPIO)?;
    fdt.end_node(node)?;

    let keys = fdt.begin_node("gpio-keys")?;
    fdt.property_string("compatible", "gpio-keys")?;
    let key = fdt.begin_node("poweroff")?;
    fdt.property_string("label", "GPIO Key Poweroff")?;
    fdt.property_u32("linux,code", KEY_POWER)?;
    fdt.property_array_u32("gpios", &[PHANDLE_GPIO, 3, GPIO_ACTIVE_HIGH])?;
    fdt.end_node(key)?;
    fdt.end_node(keys)
}

/// QEMU `virt`'s flash node: one `cfi-flash` with both banks, which edk2's NorFlashQemuLib
/// looks for (it takes the bank that does not hold its own code for the variables).
fn flash(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("flash@{FLASH_START:x}"))?;
    fdt.property_string("compatible", "cfi-flash")?;
    fdt.property_array_u64(
        "reg",
        &[
            FLASH_CODE_START,
            FLASH_BANK_SIZE,
            FLASH_VARS_START,
            FLASH_BANK_SIZE,
        ],
    )?;
    fdt.property_u32("bank-width", FLASH_BANK_WIDTH)?;
    fdt.end_node(node)
}

/// PCI address space codes of a `ranges` entry's first cell.
const PCI_SPACE_IO: u32 = 0x0100_0000;
const PCI_SPACE_MEM32: u32 = 0x0200_0000;
const PCI_SPACE_MEM64_PREFETCH: u32 = 0x4300_0000;

/// The host bridge; `io` adds QEMU `virt`'s I/O window, which edk2 refuses to do without
/// ("IO space empty") and a kernel booted directly does not need.
fn pcie(fdt: &mut FdtWriter, gic: GicKind, io: bool) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("pcie@{PCIE_ECAM_START:x}"))?;
    fdt.property_string("compatible", "pci-host-ecam-generic")?;
    fdt.property_string("device_type", "pci")?;
    fdt.property_u32("#address-cells", 3)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_array_u64("reg", &[PCIE_ECAM_START, PCIE_ECAM_SIZE])?;
    // One MiB of ECAM per bus.
    fdt.property_array_u32("bus-range", &[0, (PCIE_ECAM_SIZE >> 20) as u32 - 1])?;
    fdt.property_u32("linux,pci-domain", 0)?;
    fdt.property_null("dma-coherent")?;
    let hi = |a: u64| (a >> 32) as u32;
    let lo = |a: u64| a as u32;
    let mut ranges = Vec::new();
    if io {
        ranges.extend_from_slice(&[
            PCI_SPACE_IO,
            0,
            0,
            hi(PCIE_IO_START),
            lo(PCIE_IO_START),
            hi(PCIE_IO_SIZE),
            lo(PCIE_IO_SIZE),
        ]);
    }
    ranges.extend_from_slice(&[
        PCI_SPACE_MEM32,
        hi(PCIE_MMIO32_START),
        lo(PCIE_MMIO32_START),
        hi(PCIE_MMIO32_START),
        lo(PCIE_MMIO32_START),
        hi(PCIE_MMIO32_SIZE),
        lo(PCIE_MMIO32_SIZE),
        PCI_SPACE_MEM64_PREFETCH,
        hi(PCIE_MMIO64_START),
        lo(PCIE_MMIO64_START),
        hi(PCIE_MMIO64_START),
        lo(PCIE_MMIO64_START),
        hi(PCIE_MMIO64_SIZE),
        lo(PCIE_MMIO64_SIZE),
    ]);
    fdt.property_array_u32("ranges", &ranges)?;
    match gic {
        // Requester ID n is ITS device ID n.
        GicKind::V3 { its: true } => {
            fdt.property_array_u32("msi-map", &[0, PHANDLE_ITS, 0, 0x1_0000])?
        }
        GicKind::V2 => fdt.property_u32("msi-parent", PHANDLE_V2M)?,
        GicKind::V3 { its: false } => {}
    }
    fdt.end_node(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fdt::Fdt;

    fn config(mpidrs: &[u64], gic: GicKind) -> FdtConfig<'_> {
        FdtConfig {
            mpidrs,
            ram_size: 1 << 30,
            cmdline: "console=ttyAMA0 quiet",
            initramfs: Some((0x5000_0000, 0x1234)),
            gic,
            pcie: true,
            rng_seed: [7; 64],
            flash: false,
        }
    }

    fn u32_cells(prop: &[u8]) -> Vec<u32> {
        prop.chunks(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn test_fdt_gicv3_describes_machine() {
        let mpidrs = [0x8000_0000, 0x8000_0001, 0x8000_0002, 0x8000_0003];
        let blob = create_fdt(&config(&mpidrs, GicKind::V3 { its: true })).expect("fdt");
        let fdt = Fdt::new(&blob).expect("parses back");

        let root = fdt.find_node("/").expect("root");
        assert_eq!(
            root.property("compatible").and_then(|p| p.as_str()),
            Some("linux,dummy-virt")
        );

        let chosen = fdt.chosen();
        assert_eq!(chosen.bootargs(), Some("console=ttyAMA0 quiet"));
        assert_eq!(chosen.stdout().map(|n| n.name), Some("pl011@9000000"));
        let c = fdt.find_node("/chosen").expect("chosen");
        assert_eq!(
            c.property("linux,initrd-start").and_then(|p| p.as_usize()),
            Some(0x5000_0000)
        );
        assert_eq!(
            c.property("linux,initrd-end").and_then(|p| p.as_usize()),
            Some(0x5000_1234)
        );
        assert_eq!(c.property("rng-seed").map(|p| p.value.len()), Some(64));

        let mem: Vec<_> = fdt.memory().regions().collect();
        assert_eq!(mem.len(), 1);
        assert_eq!(mem[0].starting_address as u64, RAM_START);
        assert_eq!(mem[0].size, Some(1 << 30));

        let cpus: Vec<_> = fdt.cpus().collect();
        assert_eq!(cpus.len(), 4);
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu.ids().first(), i);
            assert_eq!(
                cpu.property("enable-method").and_then(|p| p.as_str()),
                Some("psci")
            );
        }

        let psci = fdt.find_node("/psci").expect("psci");
        assert!(psci
            .compatible()
            .expect("compatible")
            .all()
            .any(|c| c == "arm,psci-0.2"));
        assert_eq!(
            psci.property("method").and_then(|p| p.as_str()),
            Some("hvc")
        );

        let gic = fdt.find_compatible(&["arm,gic-v3"]).expect("gic");
        let regs: Vec<_> = gic.reg().expect("reg").collect();
        assert_eq!(regs[0].starting_address as u64, GIC_DIST_START);
        assert_eq!(regs[1].starting_address as u64, GIC_REDIST_START);
        assert_eq!(regs[1].size, Some(4 * 0x2_0000));
        assert!(gic.property("interrupt-controller").is_some());
        assert_eq!(gic.property("phandle").and_then(|p| p.as_usize()), Some(1));
        let its = fdt.find_compatible(&["arm,gic-v3-its"]).expect("its");
        assert!(its.property("msi-controller").is_some());
        assert_eq!(
            its.reg()
                .expect("reg")
                .next()
                .map(|r| r.starting_address as u64),
            Some(GIC_ITS_START)
        );

        let timer = fdt.find_compatible(&["arm,armv8-timer"]).expect("timer");
        let irqs = u32_cells(timer.property("interrupts").expect("interrupts").value);
        assert_eq!(irqs, vec![1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8]);

        let uart = fdt.find_compatible(&["arm,pl011"]).expect("pl011");
        assert_eq!(
            uart.reg()
                .expect("reg")
                .next()
                .map(|r| r.starting_address as u64),
            Some(UART_START)
        );
        let irqs = u32_cells(uart.property("interrupts").expect("interrupts").value);
        assert_eq!(irqs, vec![0, UART_SPI, 4]);
        let clocks = u32_cells(uart.property("clocks").expect("clocks").value);
        let clk = fdt.find_phandle(clocks[0]).expect("clock phandle resolves");
        assert_eq!(
            clk.property("clock-frequency").and_then(|p| p.as_usize()),
            Some(24_000_000)
        );

        let pci = fdt
            .find_compatible(&["pci-host-ecam-generic"])
            .expect("pcie");
        let reg = pci.reg().expect("reg").next().expect("ecam");
        assert_eq!(reg.starting_address as u64, PCIE_ECAM_START);
        assert_eq!(reg.size, Some(PCIE_ECAM_SIZE as usize));
        assert_eq!(
            u32_cells(pci.property("bus-range").expect("bus-range").value),
            vec![0, 31]
        );
        let msi_map = u32_cells(pci.property("msi-map").expect("msi-map").value);
        let its_phandle = its
            .property("phandle")
            .and_then(|p| p.as_usize())
            .expect("phandle");
        assert_eq!(msi_map, vec![0, its_phandle as u32, 0, 0x10000]);
        let ranges = u32_cells(pci.property("ranges").expect("ranges").value);
        assert_eq!(ranges.len(), 14);
        assert_eq!(ranges[0], 0x0200_0000);
        assert_eq!((ranges[2], ranges[6]), (0x1000_0000, 0x2dff_0000));
    }

    #[test]
    fn test_fdt_gicv2_has_cpu_interface_and_ppi_masks() {
        let mpidrs = [0x8000_0000, 0x8000_0001];
        let blob = create_fdt(&config(&mpidrs, GicKind::V2)).expect("fdt");
        let fdt = Fdt::new(&blob).expect("parses back");
        let gic = fdt.find_compatible(&["arm,cortex-a15-gic"]).expect("gic");
        let regs: Vec<_> = gic.reg().expect("reg").collect();
        assert_eq!(regs[1].starting_address as u64, GIC_CPU_START);
        assert!(fdt.find_compatible(&["arm,gic-v3-its"]).is_none());
        let timer = fdt.find_compatible(&["arm,armv8-timer"]).expect("timer");
        let irqs = u32_cells(timer.property("interrupts").expect("interrupts").value);
        assert_eq!(irqs[2], 8 | (0b11 << 8));
    }

    #[test]
    fn test_fdt_gicv2_has_a_v2m_frame_for_pci_msis() {
        let mpidrs = [0x8000_0000];
        let mut cfg = config(&mpidrs, GicKind::V2);
        cfg.pcie = true;
        let blob = create_fdt(&cfg).expect("fdt");
        let fdt = Fdt::new(&blob).expect("parses back");
        let v2m = fdt
            .find_compatible(&["arm,gic-v2m-frame"])
            .expect("v2m frame");
        assert!(v2m.property("msi-controller").is_some());
        let regs: Vec<_> = v2m.reg().expect("reg").collect();
        assert_eq!(regs[0].starting_address as u64, GIC_V2M_START);
        let base = u32_cells(v2m.property("arm,msi-base-spi").expect("base").value);
        let count = u32_cells(v2m.property("arm,msi-num-spis").expect("count").value);
        assert_eq!(base, [SPI_BASE + GIC_V2M_SPI_FIRST]);
        assert_eq!(count, [GIC_V2M_SPI_COUNT]);
        let phandle = v2m
            .property("phandle")
            .and_then(|p| p.as_usize())
            .expect("phandle");
        let pci = fdt
            .find_compatible(&["pci-host-ecam-generic"])
            .expect("pci");
        let parent = u32_cells(pci.property("msi-parent").expect("msi-parent").value);
        assert_eq!(parent, [phandle as u32]);
        assert!(pci.property("msi-map").is_none());
    }

    #[test]
    fn test_fdt_without_initramfs_has_no_initrd_properties() {
        let mpidrs = [0x8000_0000];
        let mut cfg = config(&mpidrs, GicKind::V3 { its: false });
        cfg.initramfs = None;
        let blob = create_fdt(&cfg).expect("fdt");
        let fdt = Fdt::new(&blob).expect("parses back");
        let c = fdt.find_node("/chosen").expect("chosen");
        assert!(c.property("linux,initrd-start").is_none());
        assert!(fdt.find_compatible(&["arm,gic-v3-its"]).is_none());
    }

    #[test]
    fn test_fdt_pl031_always_flash_only_with_firmware() {
        let mpidrs = [0x8000_0000];
        let mut cfg = config(&mpidrs, GicKind::V3 { its: true });
        let blob = create_fdt(&cfg).expect("fdt");
        let fdt = Fdt::new(&blob).expect("parses back");
        let rtc = fdt.find_compatible(&["arm,pl031"]).expect("pl031");
        assert_eq!(
            rtc.reg()
                .expect("reg")
                .next()
                .map(|r| r.starting_address as u64),
            Some(RTC_START)
        );
        let irqs = u32_cells(rtc.property("interrupts").expect("interrupts").value);
        assert_eq!(irqs, vec![0, RTC_SPI, 4]);
        assert!(fdt.find_compatible(&["cfi-flash"]).is_none());

        cfg.flash = true;
        let blob = create_fdt(&cfg).expect("fdt");
        let fdt = Fdt::new(&blob).expect("parses back");
        let flash = fdt.find_compatible(&["cfi-flash"]).expect("flash");
        let regs: Vec<_> = flash
            .reg()
            .expect("reg")
            .map(|r| (r.starting_address as u64, r.size))
            .collect();
        assert_eq!(
            regs,
            vec![(0, Some(0x400_0000)), (0x400_0000, Some(0x400_0000))]
        );
        assert_eq!(
            flash.property("bank-width").and_then(|p| p.as_usize()),
            Some(4)
        );
        // With firmware, the host bridge has an I/O window first.
        let pci = fdt
            .find_compatible(&["pci-host-ecam-generic"])
            .expect("pcie");
        let ranges = u32_cells(pci.property("ranges").expect("ranges").value);
        assert_eq!(ranges.len(), 21);
        assert_eq!(
            &ranges[..7],
            &[0x0100_0000, 0, 0, 0, 0x3dff_0000, 0, 0x1_0000]
        );
    }

    #[test]
    fn test_fdt_pl061_and_gpio_keys_power_button_as_qemu_virt() {
        let mpidrs = [0x8000_0000];
        let blob = create_fdt(&config(&mpidrs, GicKind::V3 { its: true })).expect("fdt");
        let fdt = Fdt::new(&blob).expect("parses back");
        let gpio = fdt.find_compatible(&["arm,pl061"]).expect("pl061");
        assert_eq!(gpio.name, "pl061@9030000");
        let irqs = u32_cells(gpio.property("interrupts").expect("interrupts").value);
        assert_eq!(irqs, vec![0, GPIO_SPI, 4]);
        assert!(gpio.property("gpio-controller").is_some());
        let cells = u32_cells(gpio.property("#gpio-cells").expect("cells").value);
        assert_eq!(cells, [2]);
        let phandle = gpio
            .property("phandle")
            .and_then(|p| p.as_usize())
            .expect("phandle");
        let key = fdt.find_node("/gpio-keys/poweroff").expect("poweroff key");
        let gpios = u32_cells(key.property("gpios").expect("gpios").value);
        assert_eq!(gpios, [phandle as u32, 3, 0]);
        let code = u32_cells(key.property("linux,code").expect("code").value);
        assert_eq!(code, [116]);
        let keys = fdt.find_node("/gpio-keys").expect("gpio-keys");
        assert_eq!(
            keys.property("compatible").and_then(|p| p.as_str()),
            Some("gpio-keys")
        );
    }
}
