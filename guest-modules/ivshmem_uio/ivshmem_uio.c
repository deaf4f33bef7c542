// SPDX-License-Identifier: GPL-2.0
/*
 * ivshmem_uio: a UIO driver for the ivshmem PCI device (1af4:1110) in its
 * doorbell personality (QEMU's ivshmem-doorbell, intervm's doorbell channel).
 * A device without interrupts (ivshmem-plain) is registered too, as UIO
 * name "ivshmem-plain" with no interrupt, so its BAR2 can be mapped through
 * /dev/uioN as well as through sysfs resource2.
 *
 * Userspace opens /dev/uioN and
 *   - mmaps map 0 (the page(s) holding BAR0: IntrMask, IntrStatus,
 *     IVPosition, Doorbell, from maps/map0/offset on) to read its peer ID
 *     and ring peers,
 *   - mmaps map 1 (BAR2) for the shared memory,
 *   - blocks in read() for interrupts: the returned count is the total
 *     number of interrupts so far (any vector).
 *
 * Interrupts use MSI-X (one handler per vector) when the device has it,
 * else INTx: the handler reads Interrupt Status (which clears it and lowers
 * the line) and userspace may write 0/1 to /dev/uioN to mask/unmask it.
 *
 * selftest=1 checks the device at probe time and prints one line:
 *   ivshmem_uio 0000:00:03.0: selftest: ivposition=N bar2=ok doorbell=ok irq=msix peer=none
 * It reads IVPosition, writes and reads back a pattern at the end of BAR2
 * (restoring what was there; "bar2=read-only" when the write did not land,
 * as where intervm maps another member's part of the region), rings its
 * own doorbell on vector 0 and waits for the interrupt. With
 * selftest_peer=P it then rings peer P on vector 0 and waits for P to ring
 * back ("peer=P:ok" or "peer=P:timeout"): a cross-VM interrupt round trip
 * that needs no userspace (intervm's probe guest answers with its "pong"
 * task). Each wait ends at the interrupt; its limit, SELFTEST_WAIT, only
 * catches one that never comes (a busy host may run the peer late).
 */

#include <linux/completion.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uio_driver.h>

#define IVSHMEM_VENDOR	0x1af4
#define IVSHMEM_DEVICE	0x1110

#define REG_INTR_MASK	0x00
#define REG_INTR_STATUS	0x04
#define REG_IVPOSITION	0x08
#define REG_DOORBELL	0x0c

#define MAX_VECTORS	64

static bool selftest;
module_param(selftest, bool, 0444);
MODULE_PARM_DESC(selftest, "Check registers, BAR2 and a doorbell to itself at probe");

/* How long the selftest waits for an interrupt (jiffies). */
#define SELFTEST_WAIT (30 * HZ)

static int selftest_peer = -1;
module_param(selftest_peer, int, 0444);
MODULE_PARM_DESC(selftest_peer, "With selftest=1: also ring this peer ID and wait for its answer");

struct ivshmem_uio {
	struct uio_info info;
	struct pci_dev *pdev;
	void __iomem *regs;
	int nvec;
	bool msix;
	struct completion selftest_irq;
	bool selftest_waiting;
};

static void ivshmem_uio_notify(struct ivshmem_uio *iv)
{
	if (READ_ONCE(iv->selftest_waiting))
		complete(&iv->selftest_irq);
	uio_event_notify(&iv->info);
}

static irqreturn_t ivshmem_uio_msix(int irq, void *data)
{
	ivshmem_uio_notify(data);
	return IRQ_HANDLED;
}

static irqreturn_t ivshmem_uio_intx(int irq, void *data)
{
	struct ivshmem_uio *iv = data;

	/* Reading the status clears it and deasserts the line. */
	if (!readl(iv->regs + REG_INTR_STATUS))
		return IRQ_NONE;
	ivshmem_uio_notify(iv);
	return IRQ_HANDLED;
}

/*
 * write(2) of 0 or 1 to /dev/uioN masks or unmasks INTx. MSI-X vectors
 * need no unmasking, so the write is accepted and does nothing: a generic
 * UIO client that re-enables after every interrupt works either way. (The
 * UIO core answers EIO itself when there is no interrupt at all.)
 */
static int ivshmem_uio_irqcontrol(struct uio_info *info, s32 on)
{
	struct ivshmem_uio *iv = container_of(info, struct ivshmem_uio, info);

	if (iv->msix)
		return 0;
	writel(on ? 1 : 0, iv->regs + REG_INTR_MASK);
	return 0;
}

/*
 * Picks how interrupts arrive (MSI-X vectors, INTx or none) and sets
 * info.irq accordingly, without taking any yet: no handler may run before
 * the UIO device is registered, since uio_event_notify() needs it.
 */
static void ivshmem_uio_alloc_irqs(struct ivshmem_uio *iv)
{
	struct pci_dev *pdev = iv->pdev;
	int nvec;

	nvec = pci_msix_vec_count(pdev);
	if (nvec > 0) {
		nvec = min(nvec, MAX_VECTORS);
		nvec = pci_alloc_irq_vectors(pdev, 1, nvec, PCI_IRQ_MSIX);
	}
	if (nvec > 0) {
		iv->msix = true;
		iv->nvec = nvec;
		/* UIO does not own the vectors; it only relays notifications. */
		iv->info.irq = UIO_IRQ_CUSTOM;
		return;
	}
	iv->msix = false;
	iv->nvec = 0;
	/* ivshmem-plain: no interrupts, the maps are still useful. */
	iv->info.irq = pdev->irq && pdev->pin ? UIO_IRQ_CUSTOM : UIO_IRQ_NONE;
}

/*
 * Takes the interrupts chosen by ivshmem_uio_alloc_irqs(), once the UIO
 * device exists: a ring that waited while the vector was masked (a peer
 * that rang before this driver bound) is delivered right here.
 */
static int ivshmem_uio_request_irqs(struct ivshmem_uio *iv)
{
	struct pci_dev *pdev = iv->pdev;
	int i, err;

	if (iv->msix) {
		for (i = 0; i < iv->nvec; i++) {
			err = request_irq(pci_irq_vector(pdev, i), ivshmem_uio_msix, 0,
					  "ivshmem_uio", iv);
			if (err) {
				while (--i >= 0)
					free_irq(pci_irq_vector(pdev, i), iv);
				return err;
			}
		}
		return 0;
	}
	if (iv->info.irq == UIO_IRQ_NONE)
		return 0;
	err = request_irq(pdev->irq, ivshmem_uio_intx, IRQF_SHARED, "ivshmem_uio", iv);
	if (err)
		return err;
	writel(1, iv->regs + REG_INTR_MASK);
	return 0;
}

/* Releases what ivshmem_uio_request_irqs() took. */
static void ivshmem_uio_release_irqs(struct ivshmem_uio *iv)
{
	int i;

	if (iv->msix) {
		for (i = 0; i < iv->nvec; i++)
			free_irq(pci_irq_vector(iv->pdev, i), iv);
	} else if (iv->info.irq == UIO_IRQ_CUSTOM) {
		writel(0, iv->regs + REG_INTR_MASK);
		free_irq(iv->pdev->irq, iv);
	}
}

/* Releases what ivshmem_uio_alloc_irqs() allocated. */
static void ivshmem_uio_free_vectors(struct ivshmem_uio *iv)
{
	if (iv->msix)
		pci_free_irq_vectors(iv->pdev);
}

/* Rings (peer, vector 0) and waits up to @timeout for any interrupt. */
static bool ivshmem_uio_ring_and_wait(struct ivshmem_uio *iv, u32 peer, unsigned long timeout)
{
	bool ok;

	reinit_completion(&iv->selftest_irq);
	WRITE_ONCE(iv->selftest_waiting, true);
	writel(peer << 16, iv->regs + REG_DOORBELL);
	ok = wait_for_completion_timeout(&iv->selftest_irq, timeout) > 0;
	WRITE_ONCE(iv->selftest_waiting, false);
	return ok;
}

static void ivshmem_uio_selftest(struct ivshmem_uio *iv)
{
	struct pci_dev *pdev = iv->pdev;
	resource_size_t len = pci_resource_len(pdev, 2);
	void __iomem *shm;
	u32 id, saved, seen;
	const char *bar2 = "FAILED";
	bool bell_ok = false, peer_ok = false;
	char peer[24];

	id = readl(iv->regs + REG_IVPOSITION);
	shm = len >= 8 ? pci_iomap_range(pdev, 2, len - 8, 8) : NULL;
	if (shm) {
		saved = readl(shm);
		writel(0x5a17e57u ^ id, shm);
		seen = readl(shm);
		writel(saved, shm);
		/*
		 * An intervm VMM maps the parts of the region other members
		 * write read-only: the write is dropped there, and the old
		 * value reads back.
		 */
		if (seen == (0x5a17e57u ^ id))
			bar2 = "ok";
		else if (seen == saved)
			bar2 = "read-only";
		pci_iounmap(pdev, shm);
	}
	if (iv->info.irq == UIO_IRQ_NONE) {
		dev_info(&pdev->dev, "selftest: ivposition=%u bar2=%s doorbell=none irq=none peer=none\n",
			 id, bar2);
		return;
	}
	bell_ok = ivshmem_uio_ring_and_wait(iv, id, SELFTEST_WAIT);
	if (selftest_peer >= 0 && selftest_peer <= 0xffff)
		peer_ok = ivshmem_uio_ring_and_wait(iv, selftest_peer, SELFTEST_WAIT);
	if (selftest_peer < 0)
		snprintf(peer, sizeof(peer), "none");
	else
		snprintf(peer, sizeof(peer), "%d:%s", selftest_peer, peer_ok ? "ok" : "timeout");
	dev_info(&pdev->dev, "selftest: ivposition=%u bar2=%s doorbell=%s irq=%s peer=%s\n", id,
		 bar2, bell_ok ? "ok" : "timeout",
		 iv->msix ? "msix" : "intx", peer);
}

static int ivshmem_uio_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct ivshmem_uio *iv;
	int err;

	iv = devm_kzalloc(&pdev->dev, sizeof(*iv), GFP_KERNEL);
	if (!iv)
		return -ENOMEM;
	iv->pdev = pdev;
	init_completion(&iv->selftest_irq);

	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = pcim_iomap_regions(pdev, BIT(0) | BIT(2), "ivshmem_uio");
	if (err)
		return err;
	iv->regs = pcim_iomap_table(pdev)[0];
	pci_set_master(pdev);

	iv->info.name = "ivshmem";
	iv->info.version = "1";
	iv->info.mem[0].name = "registers";
	/*
	 * UIO maps whole pages and refuses a map that does not start on one
	 * (ENODEV) or an mmap longer than the map, so the 256-byte register
	 * BAR is offered as the page(s) holding it, with its place in them in
	 * maps/map0/offset: firmware may pack small BARs into one page. The
	 * rest of that page may hold another device's small BAR; only root
	 * can open /dev/uioN, and root can map /dev/mem anyway.
	 */
	iv->info.mem[0].addr = pci_resource_start(pdev, 0) & PAGE_MASK;
	iv->info.mem[0].offs = pci_resource_start(pdev, 0) & ~PAGE_MASK;
	iv->info.mem[0].size = PAGE_ALIGN(iv->info.mem[0].offs +
					  pci_resource_len(pdev, 0));
	iv->info.mem[0].memtype = UIO_MEM_PHYS;
	iv->info.mem[1].name = "shmem";
	iv->info.mem[1].addr = pci_resource_start(pdev, 2);
	iv->info.mem[1].size = pci_resource_len(pdev, 2);
	iv->info.mem[1].memtype = UIO_MEM_PHYS;
	iv->info.irqcontrol = ivshmem_uio_irqcontrol;

	ivshmem_uio_alloc_irqs(iv);
	/* Tools looking for doorbells match the name "ivshmem". */
	if (iv->info.irq == UIO_IRQ_NONE)
		iv->info.name = "ivshmem-plain";
	/* Registered first: the interrupt handlers notify this UIO device. */
	err = uio_register_device(&pdev->dev, &iv->info);
	if (err) {
		ivshmem_uio_free_vectors(iv);
		return err;
	}
	err = ivshmem_uio_request_irqs(iv);
	if (err) {
		dev_err(&pdev->dev, "no usable interrupt (%d)\n", err);
		uio_unregister_device(&iv->info);
		ivshmem_uio_free_vectors(iv);
		return err;
	}
	pci_set_drvdata(pdev, iv);
	dev_info(&pdev->dev, "ivshmem: ID %u, %llu bytes shared, %s (%d vectors)\n",
		 readl(iv->regs + REG_IVPOSITION),
		 (unsigned long long)pci_resource_len(pdev, 2),
		 iv->msix ? "MSI-X" : iv->info.irq == UIO_IRQ_NONE ? "no interrupts" : "INTx",
		 iv->nvec);
	if (selftest)
		ivshmem_uio_selftest(iv);
	return 0;
}

static void ivshmem_uio_remove(struct pci_dev *pdev)
{
	struct ivshmem_uio *iv = pci_get_drvdata(pdev);

	/* No handler may run once the UIO device is gone: release them first. */
	ivshmem_uio_release_irqs(iv);
	uio_unregister_device(&iv->info);
	ivshmem_uio_free_vectors(iv);
}

static const struct pci_device_id ivshmem_uio_ids[] = {
	{ PCI_DEVICE(IVSHMEM_VENDOR, IVSHMEM_DEVICE) },
	{ 0 }
};
MODULE_DEVICE_TABLE(pci, ivshmem_uio_ids);

static struct pci_driver ivshmem_uio_driver = {
	.name = "ivshmem_uio",
	.id_table = ivshmem_uio_ids,
	.probe = ivshmem_uio_probe,
	.remove = ivshmem_uio_remove,
};
module_pci_driver(ivshmem_uio_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("UIO driver for ivshmem-doorbell (intervm)");
