//! Checks a raw disk image against what the ARM VM System Specification asks of a portable
//! image (`bulkhead image check`, docs/image-check.md): a valid GPT (both copies), an EFI
//! System Partition, FAT32 on it, the removable-media boot file for the architecture, and that
//! file a PE/COFF EFI application for that machine.
//!
//! Everything is parsed here from the bytes (GPT, FAT, PE headers): no mounting, no root.
//! Logical sectors are 512 bytes.

use std::io::{Read, Seek, SeekFrom};

/// Logical sector size assumed for the image.
const SECTOR: u64 = 512;
/// Type GUID of an EFI System Partition, C12A7328-F81F-11D2-BA4B-00A0C93EC93B, as GPT stores
/// it (first three fields little endian).
const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
/// Largest partition table Bulkhead reads (the usual is 128 entries of 128 bytes).
const MAX_ENTRIES_BYTES: u64 = 1 << 20;
/// Largest boot file read for its PE headers.
const PE_HEADER_READ: u64 = 4096;

/// The guest architecture an image is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// 64-bit arm: `BOOTAA64.EFI`, machine 0xAA64.
    Aarch64,
    /// 32-bit arm: `BOOTARM.EFI`, machine 0x01C2.
    Arm,
}

impl Arch {
    /// The removable-media file name.
    pub fn boot_file(self) -> &'static str {
        match self {
            Arch::Aarch64 => "BOOTAA64.EFI",
            Arch::Arm => "BOOTARM.EFI",
        }
    }

    /// The PE/COFF machine type.
    pub fn machine(self) -> u16 {
        match self {
            Arch::Aarch64 => 0xaa64,
            Arch::Arm => 0x01c2,
        }
    }
}

/// One rule's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Short name of the rule.
    pub name: &'static str,
    /// What the specification requires.
    pub required: String,
    /// What the image has.
    pub found: String,
    /// Whether the image meets it.
    pub ok: bool,
}

/// The result of checking an image: one rule per line.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The rules, in the order checked.
    pub rules: Vec<Rule>,
}

impl Report {
    /// Whether every rule holds.
    pub fn conforms(&self) -> bool {
        !self.rules.is_empty() && self.rules.iter().all(|r| r.ok)
    }

    fn push(&mut self, name: &'static str, required: &str, found: String, ok: bool) -> bool {
        self.rules.push(Rule {
            name,
            required: required.to_string(),
            found,
            ok,
        });
        ok
    }

    /// Marks the rules after a failed one as not checked.
    fn skip(&mut self, names: &[(&'static str, &str)], why: &str) {
        for (name, required) in names {
            self.push(name, required, format!("not checked: {why}"), false);
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.rules {
            writeln!(
                f,
                "{} {}: required {}; found {}",
                if r.ok { "ok  " } else { "FAIL" },
                r.name,
                r.required,
                r.found
            )?;
        }
        Ok(())
    }
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// A GUID as GPT stores it, in its usual text form.
fn guid_string(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

/// A source of image bytes.
struct Image<'a, R> {
    r: &'a mut R,
    size: u64,
}

impl<R: Read + Seek> Image<'_, R> {
    /// `len` bytes at `off`; `None` past the end of the image.
    fn read(&mut self, off: u64, len: u64) -> std::io::Result<Option<Vec<u8>>> {
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Ok(None);
        }
        self.r.seek(SeekFrom::Start(off))?;
        let mut buf = vec![0u8; len as usize];
        self.r.read_exact(&mut buf)?;
        Ok(Some(buf))
    }
}

/// A GPT header that passed its checks, and its partition entries.
struct Gpt {
    alternate_lba: u64,
    entries: Vec<u8>,
    entry_size: u64,
}

/// Reads and checks the GPT header at `lba`; `Err` says what is wrong.
fn read_gpt<R: Read + Seek>(
    img: &mut Image<'_, R>,
    lba: u64,
) -> std::io::Result<Result<Gpt, String>> {
    let Some(h) = img.read(lba * SECTOR, SECTOR)? else {
        return Ok(Err(format!("LBA {lba} is past the end of the image")));
    };
    if &h[..8] != b"EFI PART" {
        return Ok(Err(format!("no \"EFI PART\" signature at LBA {lba}")));
    }
    let header_size = u64::from(le32(&h, 12));
    if !(92..=SECTOR).contains(&header_size) {
        return Ok(Err(format!("header size {header_size} at LBA {lba}")));
    }
    let mut copy = h[..header_size as usize].to_vec();
    copy[16..20].fill(0);
    let (stored, computed) = (le32(&h, 16), crc32(&copy));
    if stored != computed {
        return Ok(Err(format!(
            "header CRC32 at LBA {lba} is {stored:#010x}, the header's is {computed:#010x}"
        )));
    }
    if le64(&h, 24) != lba {
        return Ok(Err(format!(
            "header at LBA {lba} says it is at LBA {}",
            le64(&h, 24)
        )));
    }
    let entries_lba = le64(&h, 72);
    let count = u64::from(le32(&h, 80));
    let entry_size = u64::from(le32(&h, 84));
    let bytes = count.saturating_mul(entry_size);
    if entry_size < 128 || bytes > MAX_ENTRIES_BYTES {
        return Ok(Err(format!(
            "{count} partition entries of {entry_size} bytes at LBA {lba}"
        )));
    }
    let Some(entries) = img.read(entries_lba.saturating_mul(SECTOR), bytes)? else {
        return Ok(Err(format!(
            "partition entries at LBA {entries_lba} are past the end of the image"
        )));
    };
    let (stored, computed) = (le32(&h, 88), crc32(&entries));
    if stored != computed {
        return Ok(Err(format!(
            "partition entries CRC32 of the header at LBA {lba} is {stored:#010x}, the entries' is {computed:#010x}"
        )));
    }
    Ok(Ok(Gpt {
        alternate_lba: le64(&h, 32),
        entries,
        entry_size,
    }))
}

/// The geometry of a FAT file system.
struct Fat {
    /// Byte offset of the file system in the image.
    base: u64,
    bytes_per_sector: u64,
    sectors_per_cluster: u64,
    fat_start: u64,
    data_start: u64,
    root_cluster: u32,
    clusters: u64,
}

/// What the partition's boot sector says: FAT32 geometry, or what else it is.
fn read_fat<R: Read + Seek>(
    img: &mut Image<'_, R>,
    base: u64,
) -> std::io::Result<Result<Fat, String>> {
    let Some(b) = img.read(base, 512)? else {
        return Ok(Err("the partition is past the end of the image".into()));
    };
    if &b[3..11] == b"EXFAT   " {
        return Ok(Err("exFAT".into()));
    }
    if le16(&b, 510) != 0xaa55 {
        return Ok(Err(
            "no boot sector signature (0xAA55): not a FAT file system".into(),
        ));
    }
    let bps = u64::from(le16(&b, 11));
    let spc = u64::from(b[13]);
    let reserved = u64::from(le16(&b, 14));
    let fats = u64::from(b[16]);
    let root_entries = u64::from(le16(&b, 17));
    let total16 = u64::from(le16(&b, 19));
    let fatsz16 = u64::from(le16(&b, 22));
    let total32 = u64::from(le32(&b, 32));
    if !matches!(bps, 512 | 1024 | 2048 | 4096) || !spc.is_power_of_two() || fats == 0 {
        return Ok(Err(format!(
            "no FAT BIOS parameter block ({bps} bytes per sector, {spc} sectors per cluster)"
        )));
    }
    let fat_size = if fatsz16 != 0 {
        fatsz16
    } else {
        u64::from(le32(&b, 36))
    };
    let total = if total16 != 0 { total16 } else { total32 };
    let root_dir_sectors = (root_entries * 32).div_ceil(bps);
    let data_start = reserved + fats * fat_size + root_dir_sectors;
    let clusters = total.saturating_sub(data_start) / spc;
    // Microsoft's rule: the cluster count alone decides the FAT type.
    let kind = if clusters < 4085 {
        "FAT12"
    } else if clusters < 65525 {
        "FAT16"
    } else {
        "FAT32"
    };
    if kind != "FAT32" || fatsz16 != 0 {
        return Ok(Err(format!("{kind} ({clusters} clusters)")));
    }
    Ok(Ok(Fat {
        base,
        bytes_per_sector: bps,
        sectors_per_cluster: spc,
        fat_start: reserved,
        data_start,
        root_cluster: le32(&b, 44),
        clusters,
    }))
}

/// A directory entry: long or short name, first cluster, size, whether a directory.
struct Entry {
    name: String,
    cluster: u32,
    size: u32,
    dir: bool,
}

impl Fat {
    fn cluster_bytes(&self) -> u64 {
        self.bytes_per_sector * self.sectors_per_cluster
    }

    /// The clusters of a chain, bounded by the volume's cluster count.
    fn chain<R: Read + Seek>(
        &self,
        img: &mut Image<'_, R>,
        first: u32,
    ) -> std::io::Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut c = first;
        while (2..0x0fff_fff8).contains(&c) && (out.len() as u64) <= self.clusters {
            out.push(c);
            let off = self.base + self.fat_start * self.bytes_per_sector + u64::from(c) * 4;
            match img.read(off, 4)? {
                Some(e) => c = le32(&e, 0) & 0x0fff_ffff,
                None => break,
            }
        }
        Ok(out)
    }

    fn read_chain<R: Read + Seek>(
        &self,
        img: &mut Image<'_, R>,
        first: u32,
        limit: u64,
    ) -> std::io::Result<Vec<u8>> {
        let mut data = Vec::new();
        for c in self.chain(img, first)? {
            if data.len() as u64 >= limit {
                break;
            }
            let off = self.base
                + (self.data_start + u64::from(c - 2) * self.sectors_per_cluster)
                    * self.bytes_per_sector;
            match img.read(off, self.cluster_bytes())? {
                Some(d) => data.extend_from_slice(&d),
                None => break,
            }
        }
        data.truncate(limit.min(data.len() as u64) as usize);
        Ok(data)
    }

    fn list<R: Read + Seek>(
        &self,
        img: &mut Image<'_, R>,
        cluster: u32,
    ) -> std::io::Result<Vec<Entry>> {
        let data = self.read_chain(img, cluster, 64 << 20)?;
        let mut out = Vec::new();
        let mut lfn: Vec<u16> = Vec::new();
        for e in data.chunks_exact(32) {
            match e[0] {
                0 => break,
                0xe5 => {
                    lfn.clear();
                    continue;
                }
                _ => {}
            }
            let attr = e[11];
            if attr == 0x0f {
                // A long-name piece; pieces come last first.
                let mut part: Vec<u16> = Vec::new();
                for range in [1..11, 14..26, 28..32] {
                    for c in e[range].chunks_exact(2) {
                        part.push(u16::from_le_bytes([c[0], c[1]]));
                    }
                }
                let end = part
                    .iter()
                    .position(|&c| c == 0 || c == 0xffff)
                    .unwrap_or(part.len());
                part.truncate(end);
                part.extend_from_slice(&lfn);
                lfn = part;
                continue;
            }
            if attr & 0x08 != 0 {
                lfn.clear();
                continue;
            }
            let name = if lfn.is_empty() {
                let base = String::from_utf8_lossy(&e[0..8]).trim_end().to_string();
                let ext = String::from_utf8_lossy(&e[8..11]).trim_end().to_string();
                if ext.is_empty() {
                    base
                } else {
                    format!("{base}.{ext}")
                }
            } else {
                String::from_utf16_lossy(&lfn)
            };
            lfn.clear();
            out.push(Entry {
                name,
                cluster: (u32::from(le16(e, 20)) << 16) | u32::from(le16(e, 26)),
                size: le32(e, 28),
                dir: attr & 0x10 != 0,
            });
        }
        Ok(out)
    }

    /// Looks a path up, case-insensitively as FAT does.
    fn lookup<R: Read + Seek>(
        &self,
        img: &mut Image<'_, R>,
        path: &[&str],
    ) -> std::io::Result<Result<Entry, String>> {
        let mut cluster = self.root_cluster;
        let mut walked = String::new();
        for (i, part) in path.iter().enumerate() {
            let entries = self.list(img, cluster)?;
            let Some(e) = entries
                .into_iter()
                .find(|e| e.name.eq_ignore_ascii_case(part))
            else {
                return Ok(Err(format!("no {walked}\\{part}")));
            };
            walked.push('\\');
            walked.push_str(&e.name);
            if i + 1 == path.len() {
                return Ok(if e.dir {
                    Err(format!("{walked} is a directory"))
                } else {
                    Ok(e)
                });
            }
            if !e.dir {
                return Ok(Err(format!("{walked} is not a directory")));
            }
            cluster = e.cluster;
        }
        Ok(Err("empty path".into()))
    }
}

/// What a PE/COFF header says: machine and subsystem, or why it is not one.
fn read_pe(head: &[u8]) -> Result<(u16, u16), String> {
    if head.len() < 64 || &head[..2] != b"MZ" {
        return Err("no MZ header: not a PE/COFF file".into());
    }
    let pe = le32(head, 0x3c) as usize;
    if pe.checked_add(24 + 70).is_none_or(|end| end > head.len()) || &head[pe..pe + 4] != b"PE\0\0"
    {
        return Err("no PE signature: not a PE/COFF file".into());
    }
    let machine = le16(head, pe + 4);
    let opt = pe + 24;
    let magic = le16(head, opt);
    if magic != 0x10b && magic != 0x20b {
        return Err(format!("optional header magic {magic:#x}"));
    }
    // Subsystem is at offset 68 of both the PE32 and PE32+ optional headers.
    Ok((machine, le16(head, opt + 68)))
}

fn machine_name(m: u16) -> String {
    match m {
        0xaa64 => "0xAA64 (arm64)".into(),
        0x01c2 => "0x01C2 (arm)".into(),
        0x01c4 => "0x01C4 (arm Thumb-2)".into(),
        0x8664 => "0x8664 (x86_64)".into(),
        0x014c => "0x014C (i386)".into(),
        0x5064 => "0x5064 (riscv64)".into(),
        m => format!("{m:#06x}"),
    }
}

/// Checks an image. `Err` only for I/O errors reading it (bad input).
pub fn check<R: Read + Seek>(r: &mut R, arch: Arch) -> std::io::Result<Report> {
    let size = r.seek(SeekFrom::End(0))?;
    let mut img = Image { r, size };
    let mut report = Report::default();
    let boot_path = format!("\\EFI\\BOOT\\{}", arch.boot_file());
    let req_gpt = "a protective MBR and a GPT header at LBA 1 with valid header and entry CRC32s";
    let req_backup = "the backup GPT header at the last LBA, valid, with the same entries";
    let req_esp = "a partition of type C12A7328-F81F-11D2-BA4B-00A0C93EC93B (EFI System)";
    let req_fat = "FAT32 on the EFI System Partition (not FAT12/16, not exFAT)";
    let req_file = format!("the removable-media file {boot_path}");
    let req_pe = format!(
        "a PE/COFF EFI application (subsystem 10) for machine {}",
        machine_name(arch.machine())
    );
    let rest = [
        ("esp", req_esp),
        ("fat32", req_fat),
        ("boot-file", req_file.as_str()),
        ("pe", req_pe.as_str()),
    ];

    // Protective MBR and primary GPT.
    let mbr = img.read(0, SECTOR)?;
    let mbr_ok = mbr
        .as_ref()
        .is_some_and(|m| le16(m, 510) == 0xaa55 && (0..4).any(|i| m[446 + 16 * i + 4] == 0xee));
    let primary = read_gpt(&mut img, 1)?;
    let gpt = match (mbr_ok, primary) {
        (true, Ok(g)) => {
            report.push(
                "gpt",
                req_gpt,
                "protective MBR, header and entries CRC32s valid".into(),
                true,
            );
            g
        }
        (false, Ok(_)) => {
            report.push(
                "gpt",
                req_gpt,
                "a GPT but no protective MBR (no partition of type 0xEE)".into(),
                false,
            );
            report.skip(&[("gpt-backup", req_backup)], "no valid GPT");
            report.skip(&rest, "no valid GPT");
            return Ok(report);
        }
        (_, Err(why)) => {
            let found = if why.starts_with("no \"EFI PART\"") {
                format!("no GPT ({why})")
            } else {
                format!("a corrupt GPT: {why}")
            };
            report.push("gpt", req_gpt, found, false);
            report.skip(&[("gpt-backup", req_backup)], "no valid GPT");
            report.skip(&rest, "no valid GPT");
            return Ok(report);
        }
    };

    // Backup GPT.
    let last_lba = size / SECTOR - 1;
    match read_gpt(&mut img, gpt.alternate_lba)? {
        Ok(_) if gpt.alternate_lba != last_lba => report.push(
            "gpt-backup",
            req_backup,
            format!(
                "the backup at LBA {} but the last LBA is {last_lba}",
                gpt.alternate_lba
            ),
            false,
        ),
        Ok(b) if b.entries != gpt.entries => report.push(
            "gpt-backup",
            req_backup,
            "a valid backup header whose entries differ from the primary's".into(),
            false,
        ),
        Ok(_) => report.push(
            "gpt-backup",
            req_backup,
            format!("valid, at LBA {last_lba}"),
            true,
        ),
        Err(why) => report.push("gpt-backup", req_backup, format!("invalid: {why}"), false),
    };

    // The ESP.
    let mut types = Vec::new();
    let mut esp = None;
    for e in gpt.entries.chunks_exact(gpt.entry_size as usize) {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        if e[..16] == ESP_TYPE && esp.is_none() {
            esp = Some((le64(e, 32), le64(e, 40)));
        }
        types.push(guid_string(&e[..16]));
    }
    let Some((first, last)) = esp else {
        let found = if types.is_empty() {
            "no partitions".into()
        } else {
            format!("partitions of type {}", types.join(", "))
        };
        report.push("esp", rest[0].1, found, false);
        report.skip(&rest[1..], "no EFI System Partition");
        return Ok(report);
    };
    report.push(
        "esp",
        rest[0].1,
        format!("an EFI System Partition at LBA {first}..={last}"),
        true,
    );

    // FAT32.
    let fat = match read_fat(&mut img, first * SECTOR)? {
        Ok(f) => {
            report.push(
                "fat32",
                rest[1].1,
                format!("FAT32 ({} clusters)", f.clusters),
                true,
            );
            f
        }
        Err(why) => {
            report.push("fat32", rest[1].1, why, false);
            report.skip(&rest[2..], "no FAT32 file system");
            return Ok(report);
        }
    };

    // The boot file.
    let entry = match fat.lookup(&mut img, &["EFI", "BOOT", arch.boot_file()])? {
        Ok(e) => {
            report.push(
                "boot-file",
                rest[2].1,
                format!("{boot_path}, {} bytes", e.size),
                true,
            );
            e
        }
        Err(why) => {
            report.push("boot-file", rest[2].1, why, false);
            report.skip(&rest[3..], "no boot file");
            return Ok(report);
        }
    };

    // Its PE header.
    let head = fat.read_chain(
        &mut img,
        entry.cluster,
        u64::from(entry.size).min(PE_HEADER_READ),
    )?;
    match read_pe(&head) {
        Ok((machine, subsystem)) => {
            let ok = machine == arch.machine() && subsystem == 10;
            let sub = match subsystem {
                10 => "EFI application".to_string(),
                11 => "EFI boot service driver".to_string(),
                12 => "EFI runtime driver".to_string(),
                s => format!("subsystem {s}"),
            };
            report.push(
                "pe",
                rest[3].1,
                format!("PE/COFF for machine {}, {sub}", machine_name(machine)),
                ok,
            );
        }
        Err(why) => {
            report.push("pe", rest[3].1, why, false);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn test_crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    /// ESP size in sectors: enough clusters for FAT32 with one sector per cluster.
    const ESP_SECTORS: u64 = 70_000;
    const ESP_LBA: u64 = 2048;

    fn put(img: &mut [u8], off: u64, data: &[u8]) {
        img[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32) -> [u8; 32] {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(name);
        e[11] = attr;
        e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
        e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
        e[28..32].copy_from_slice(&size.to_le_bytes());
        e
    }

    fn pe(machine: u16, subsystem: u16) -> Vec<u8> {
        let mut f = vec![0u8; 1024];
        f[..2].copy_from_slice(b"MZ");
        f[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        f[0x80..0x84].copy_from_slice(b"PE\0\0");
        f[0x84..0x86].copy_from_slice(&machine.to_le_bytes());
        f[0x98..0x9a].copy_from_slice(&0x20bu16.to_le_bytes());
        f[0x98 + 68..0x98 + 70].copy_from_slice(&subsystem.to_le_bytes());
        f
    }

    /// A minimal FAT32 volume with \EFI\BOOT\<name> holding `file`.
    fn fat32(name: &[u8; 11], file: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; (ESP_SECTORS * SECTOR) as usize];
        let reserved = 32u64;
        let fat_sectors = 600u64;
        let b = &mut v[..512];
        b[3..11].copy_from_slice(b"mkfs.fat");
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[13] = 1;
        b[14..16].copy_from_slice(&(reserved as u16).to_le_bytes());
        b[16] = 1;
        b[32..36].copy_from_slice(&(ESP_SECTORS as u32).to_le_bytes());
        b[36..40].copy_from_slice(&(fat_sectors as u32).to_le_bytes());
        b[44..48].copy_from_slice(&2u32.to_le_bytes());
        b[510] = 0x55;
        b[511] = 0xaa;
        let fat = reserved * 512;
        let data = (reserved + fat_sectors) * 512;
        let cluster = |c: u64| data + (c - 2) * 512;
        // Clusters: 2 root, 3 EFI, 4 BOOT, 5.. the file.
        let file_clusters = (file.len() as u64).div_ceil(512).max(1);
        for c in 2..5u64 {
            put(&mut v, fat + c * 4, &0x0fff_ffffu32.to_le_bytes());
        }
        for i in 0..file_clusters {
            let c = 5 + i;
            let next = if i + 1 == file_clusters {
                0x0fff_ffff
            } else {
                c as u32 + 1
            };
            put(&mut v, fat + c * 4, &next.to_le_bytes());
        }
        put(&mut v, cluster(2), &short_entry(b"EFI        ", 0x10, 3, 0));
        put(&mut v, cluster(3), &short_entry(b".          ", 0x10, 3, 0));
        put(
            &mut v,
            cluster(3) + 32,
            &short_entry(b"BOOT       ", 0x10, 4, 0),
        );
        put(
            &mut v,
            cluster(4),
            &short_entry(name, 0x20, 5, file.len() as u32),
        );
        put(&mut v, cluster(5), file);
        v
    }

    /// A GPT disk with one partition of type `ty` holding `fs`.
    fn disk(ty: [u8; 16], fs: &[u8]) -> Vec<u8> {
        let total = ESP_LBA + ESP_SECTORS + 2048;
        let mut v = vec![0u8; (total * SECTOR) as usize];
        // Protective MBR.
        v[446 + 4] = 0xee;
        v[510] = 0x55;
        v[511] = 0xaa;
        let mut entries = vec![0u8; 128 * 128];
        entries[..16].copy_from_slice(&ty);
        entries[16] = 1;
        entries[32..40].copy_from_slice(&ESP_LBA.to_le_bytes());
        entries[40..48].copy_from_slice(&(ESP_LBA + ESP_SECTORS - 1).to_le_bytes());
        let entries_crc = crc32(&entries);
        let last = total - 1;
        let header = |my: u64, alt: u64, entries_lba: u64| {
            let mut h = vec![0u8; 92];
            h[..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&34u64.to_le_bytes());
            h[48..56].copy_from_slice(&(last - 33).to_le_bytes());
            h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
            let crc = crc32(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            h
        };
        put(&mut v, SECTOR, &header(1, last, 2));
        put(&mut v, 2 * SECTOR, &entries);
        put(&mut v, (last - 32) * SECTOR, &entries);
        put(&mut v, last * SECTOR, &header(last, 1, last - 32));
        put(&mut v, ESP_LBA * SECTOR, fs);
        v
    }

    fn good() -> Vec<u8> {
        disk(ESP_TYPE, &fat32(b"BOOTAA64EFI", &pe(0xaa64, 10)))
    }

    fn run(img: Vec<u8>, arch: Arch) -> Report {
        let r = check(&mut Cursor::new(img), arch).expect("readable");
        println!("{r}");
        r
    }

    fn failed(r: &Report) -> Vec<(&'static str, String)> {
        r.rules
            .iter()
            .filter(|x| !x.ok && !x.found.starts_with("not checked"))
            .map(|x| (x.name, x.found.clone()))
            .collect()
    }

    #[test]
    fn test_image_check_good_image_conforms() {
        let r = run(good(), Arch::Aarch64);
        assert!(r.conforms(), "{r}");
        assert_eq!(r.rules.len(), 6);
    }

    #[test]
    fn test_image_check_no_gpt() {
        let mut img = good();
        img[..(34 * SECTOR) as usize].fill(0);
        let r = run(img, Arch::Aarch64);
        assert!(!r.conforms());
        let f = failed(&r);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0, "gpt");
        assert!(f[0].1.starts_with("no GPT"), "{}", f[0].1);
    }

    #[test]
    fn test_image_check_corrupt_header() {
        let mut img = good();
        img[(SECTOR + 40) as usize] ^= 1;
        let f = failed(&run(img, Arch::Aarch64));
        assert_eq!(f[0].0, "gpt");
        assert!(f[0].1.contains("header CRC32"), "{}", f[0].1);
    }

    #[test]
    fn test_image_check_corrupt_backup() {
        let mut img = good();
        let len = img.len();
        img[len - 512 + 40] ^= 1;
        let f = failed(&run(img, Arch::Aarch64));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0, "gpt-backup");
    }

    #[test]
    fn test_image_check_wrong_esp_type() {
        let mut ty = ESP_TYPE;
        ty[0] = 0xaf; // Linux filesystem data is 0FC63DAF-...; any other type will do.
        let f = failed(&run(
            disk(ty, &fat32(b"BOOTAA64EFI", &pe(0xaa64, 10))),
            Arch::Aarch64,
        ));
        assert_eq!(f[0].0, "esp");
        assert!(f[0].1.contains("C12A73AF"), "{}", f[0].1);
    }

    #[test]
    fn test_image_check_fat16() {
        let mut fs = fat32(b"BOOTAA64EFI", &pe(0xaa64, 10));
        // 20000 sectors: under 65525 clusters.
        fs[32..36].copy_from_slice(&20_000u32.to_le_bytes());
        let f = failed(&run(disk(ESP_TYPE, &fs), Arch::Aarch64));
        assert_eq!(f[0].0, "fat32");
        assert!(f[0].1.starts_with("FAT16"), "{}", f[0].1);
        let mut fs = fat32(b"BOOTAA64EFI", &pe(0xaa64, 10));
        fs[3..11].copy_from_slice(b"EXFAT   ");
        let f = failed(&run(disk(ESP_TYPE, &fs), Arch::Aarch64));
        assert_eq!(f[0].1, "exFAT");
    }

    #[test]
    fn test_image_check_missing_boot_file() {
        let f = failed(&run(
            disk(ESP_TYPE, &fat32(b"GRUBAA64EFI", &pe(0xaa64, 10))),
            Arch::Aarch64,
        ));
        assert_eq!(f[0].0, "boot-file");
        assert!(f[0].1.contains("BOOTAA64.EFI"), "{}", f[0].1);
    }

    #[test]
    fn test_image_check_x86_64_binary() {
        let f = failed(&run(
            disk(ESP_TYPE, &fat32(b"BOOTAA64EFI", &pe(0x8664, 10))),
            Arch::Aarch64,
        ));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0, "pe");
        assert!(f[0].1.contains("x86_64"), "{}", f[0].1);
    }

    #[test]
    fn test_image_check_arm_wants_bootarm() {
        let r = run(
            disk(ESP_TYPE, &fat32(b"BOOTARM EFI", &pe(0x01c2, 10))),
            Arch::Arm,
        );
        assert!(r.conforms(), "{r}");
        let f = failed(&run(good(), Arch::Arm));
        assert_eq!(f[0].0, "boot-file");
    }

    #[test]
    fn test_image_check_driver_is_not_application() {
        let f = failed(&run(
            disk(ESP_TYPE, &fat32(b"BOOTAA64EFI", &pe(0xaa64, 11))),
            Arch::Aarch64,
        ));
        assert!(f[0].1.contains("boot service driver"), "{}", f[0].1);
    }
}
