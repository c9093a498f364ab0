// Disk contents for the simulator: snapshot chains that freeze disk contents, and changed block
// tracking computed from those contents. ALL OF THIS FILE IS ADDED BY ALIKE: govmomi 0.24.2's
// simulator creates empty disk files, never writes or copies them at a snapshot, and has no CBT.
//
// Model (see main.go's package comment for what a client sees):
//
//   - A disk is a chain of nodes. A node is a descriptor "[ds] dir/name.vmdk" with its data in
//     "[ds] dir/name-flat.vmdk" (a plain, sparse, capacity-sized file), and a parent node.
//   - CreateSnapshot_Task freezes every disk of the VM: the VM's current node becomes the
//     snapshot's node (never written again while the snapshot exists), and the VM moves to a new
//     child node "<base>-00000N.vmdk" holding a copy of it, as vSphere moves a VM to a delta disk.
//     (vSphere's delta would be a sparse -delta/-sesparse extent; here it is a full -flat copy.)
//   - RemoveSnapshot_Task / RemoveAllSnapshots_Task consolidate as vSphere does: the removed
//     snapshot's node takes the contents of its only child (the child's -flat file is renamed over
//     it) and whatever used the child (the VM, a later snapshot) uses the parent's name again; a
//     node left without snapshot and children is deleted. Removing the only snapshot puts the VM
//     back on its base disk ("disk1.vmdk").
//   - Disks in an independent mode (diskMode independent_persistent / independent_nonpersistent)
//     are left out of snapshots, as in vSphere: the snapshot's config names the live disk, with
//     no changeId, and QueryChangedDiskAreas on it is a FileFault.
//   - RevertToSnapshot_Task / RevertToCurrentSnapshot_Task put the VM on a new child node with a
//     copy of the snapshot's contents (0.24.2 only moved the currentSnapshot pointer).
//   - CBT: while config.changeTrackingEnabled is true, each disk has an epoch (a random 16-byte id)
//     and a counter; every snapshot gives each disk the changeId "<epoch bytes>/<n>" (in the
//     snapshot's and the VM's current backing.changeId), and keeps the content hash of every
//     granule (64 KiB by default) of the frozen node under that changeId. Turning CBT off, or a
//     change of the disk's capacity, ends the epoch: its changeIds are refused from then on.
//     QueryChangedDiskAreas compares the hashes of the changeId's instant with the snapshot's, so
//     the areas it returns are the granules whose contents really differ.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"os"
	"path"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	seekData = 3 // SEEK_DATA (Linux)
	seekHole = 4 // SEEK_HOLE (Linux)
	// changeIds kept per disk; an older one is answered as unknown (FileFault), as a changeId
	// whose tracking data is gone would be
	maxRecords = 32
)

type vmState struct {
	ref   types.ManagedObjectReference
	cbt   bool
	disks map[int32]*diskState
	snaps map[types.ManagedObjectReference]*snapState
}

type diskState struct {
	key      int32
	capacity int64
	current  string            // datastore path of the VM's current node
	nodes    map[string]string // node -> parent node ("" for a base disk)
	epoch    string            // "" while CBT is off for this disk
	seq      int
	records  map[string]*cbtRecord
}

type cbtRecord struct {
	seq      int
	capacity int64
	hashes   []uint64 // one per granule; holes hash as zeros
}

type snapState struct {
	disks map[int32]string // device key -> the node that the snapshot froze
}

// ---- datastore paths ------------------------------------------------------------------------

func parseDS(p string) (object.DatastorePath, bool) {
	var d object.DatastorePath
	ok := d.FromString(p)
	return d, ok && d.Datastore != ""
}

func flatName(dsPath string) string {
	return strings.TrimSuffix(dsPath, ".vmdk") + "-flat.vmdk"
}

func datastoreDir(name string) (string, bool) {
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok && ds.Name == name {
			return ds.Info.GetDatastoreInfo().Url, true
		}
	}
	return "", false
}

// localPath maps "[ds] dir/file" to the file on this machine.
func localPath(dsPath string) (string, error) {
	d, ok := parseDS(dsPath)
	if !ok {
		return "", fmt.Errorf("not a datastore path: %q", dsPath)
	}
	dir, ok := datastoreDir(d.Datastore)
	if !ok {
		return "", fmt.Errorf("no datastore %q", d.Datastore)
	}
	return path.Join(dir, d.Path), nil
}

func localFlat(dsPath string) (string, error) { return localPath(flatName(dsPath)) }

var deltaSuffix = regexp.MustCompile(`-[0-9]{6}$`)

// nextDeltaName picks "<base>-00000N.vmdk" beside node, unused on the datastore and in the chain.
func nextDeltaName(ds *diskState, node string) (string, error) {
	base := deltaSuffix.ReplaceAllString(strings.TrimSuffix(node, ".vmdk"), "")
	for n := 1; n < 1000000; n++ {
		cand := fmt.Sprintf("%s-%06d.vmdk", base, n)
		if _, used := ds.nodes[cand]; used {
			continue
		}
		lp, err := localPath(cand)
		if err != nil {
			return "", err
		}
		if _, err := os.Stat(lp); err == nil {
			continue
		}
		if _, err := os.Stat(strings.TrimSuffix(lp, ".vmdk") + "-flat.vmdk"); err == nil {
			continue
		}
		return cand, nil
	}
	return "", errors.New("no free delta disk name")
}

// ---- files --------------------------------------------------------------------------------

// writeDescriptor writes a monolithic-flat VMDK descriptor for node (a text file, as on VMFS).
func writeDescriptor(node string, capacity int64, parent string) error {
	lp, err := localPath(node)
	if err != nil {
		return err
	}
	d, _ := parseDS(flatName(node))
	var b strings.Builder
	b.WriteString("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\n")
	if parent != "" {
		pd, _ := parseDS(parent)
		fmt.Fprintf(&b, "parentCID=fffffffe\nparentFileNameHint=%q\n", path.Base(pd.Path))
	} else {
		b.WriteString("parentCID=ffffffff\n")
	}
	b.WriteString("createType=\"vmfs\"\n\n# Extent description\n")
	fmt.Fprintf(&b, "RW %d VMFS %q\n\n# The Disk Data Base\n#DDB\n\n", (capacity+511)/512, path.Base(d.Path))
	b.WriteString("ddb.adapterType = \"lsilogic\"\nddb.thinProvisioned = \"1\"\nddb.virtualHWVersion = \"13\"\n")
	return os.WriteFile(lp, []byte(b.String()), 0o600)
}

// ensureDiskFiles gives node a descriptor (if it has none or an empty one) and a -flat file of
// at least capacity bytes (0.24.2 creates both empty).
func ensureDiskFiles(node string, capacity int64, parent string) error {
	lp, err := localPath(node)
	if err != nil {
		return err
	}
	if st, err := os.Stat(lp); err != nil || st.Size() == 0 {
		if err := os.MkdirAll(path.Dir(lp), 0o700); err != nil {
			return err
		}
		if err := writeDescriptor(node, capacity, parent); err != nil {
			return err
		}
	}
	fp, _ := localFlat(node)
	f, err := os.OpenFile(fp, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() < capacity {
		return f.Truncate(capacity)
	}
	return nil
}

// dataExtents calls fn for each [start, end) of f that holds data (SEEK_DATA/SEEK_HOLE),
// from offset from on, stopping before limit.
func dataExtents(f *os.File, from, limit int64, fn func(start, end int64) error) error {
	off := from
	for off < limit {
		start, err := f.Seek(off, seekData)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				return nil
			}
			return err
		}
		if start >= limit {
			return nil
		}
		end, err := f.Seek(start, seekHole)
		if err != nil {
			return err
		}
		if end > limit {
			end = limit
		}
		if err := fn(start, end); err != nil {
			return err
		}
		off = end
	}
	return nil
}

// copySparse copies src to dst extent by extent (copy_file_range), keeping holes. Its time and
// the bytes it copied count under `what` in /alike/stats.
func copySparse(src, dst, what string) error {
	var copied int64
	defer addCost(what, time.Now(), &copied)
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	tmp := dst + ".alike-tmp"
	out, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	err = dataExtents(in, 0, st.Size(), func(start, end int64) error {
		if _, err := in.Seek(start, io.SeekStart); err != nil {
			return err
		}
		if _, err := out.Seek(start, io.SeekStart); err != nil {
			return err
		}
		n, err := io.Copy(out, io.LimitReader(in, end-start))
		copied += n
		return err
	})
	if err == nil {
		err = out.Truncate(st.Size())
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, dst)
}

// ---- what the emulation costs (GET /alike/stats) ----------------------------------------------

// costStat: calls, seconds and bytes of one kind of work the launcher does itself (not the
// simulator's), for benchmarks that report what a real vCenter would not spend.
type costStat struct {
	Calls   int64   `json:"calls"`
	Seconds float64 `json:"seconds"`
	Bytes   int64   `json:"bytes"`
}

var costs = struct {
	sync.Mutex
	m map[string]*costStat
}{m: map[string]*costStat{}}

// addCost adds one call of `what` that began at t0 (and *bytes, if given).
func addCost(what string, t0 time.Time, bytes *int64) {
	dt := time.Since(t0).Seconds()
	costs.Lock()
	defer costs.Unlock()
	c := costs.m[what]
	if c == nil {
		c = &costStat{}
		costs.m[what] = c
	}
	c.Calls++
	c.Seconds += dt
	if bytes != nil {
		c.Bytes += *bytes
	}
}

func costSnapshot() map[string]costStat {
	costs.Lock()
	defer costs.Unlock()
	out := map[string]costStat{}
	for k, v := range costs.m {
		out[k] = *v
	}
	return out
}

// ---- content hashes -------------------------------------------------------------------------

func (s *server) zeroHash() uint64 {
	return maphash.Bytes(s.seed, make([]byte, s.granule))
}

// hashFile hashes each granule of the first capacity bytes of a -flat file. Its time and the
// bytes it read count under `what` in /alike/stats.
func (s *server) hashFile(flat string, capacity int64, what string) ([]uint64, error) {
	var read int64
	defer addCost(what, time.Now(), &read)
	n := (capacity + s.granule - 1) / s.granule
	hashes := make([]uint64, n)
	zero := s.zeroHash()
	for i := range hashes {
		hashes[i] = zero
	}
	f, err := os.Open(flat)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, s.granule)
	next := int64(0) // first granule not hashed yet
	err = dataExtents(f, 0, capacity, func(start, end int64) error {
		g := start / s.granule
		if g < next {
			g = next
		}
		for ; g*s.granule < end && g < n; g++ {
			k, err := f.ReadAt(buf, g*s.granule)
			read += int64(k)
			if err != nil && err != io.EOF {
				return err
			}
			for i := k; i < len(buf); i++ {
				buf[i] = 0
			}
			if lim := capacity - g*s.granule; lim < int64(len(buf)) {
				for i := lim; i < int64(len(buf)); i++ {
					buf[i] = 0
				}
			}
			hashes[g] = maphash.Bytes(s.seed, buf)
		}
		next = g
		return nil
	})
	return hashes, err
}

// ---- CBT ids ------------------------------------------------------------------------------

func newEpoch() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	parts := make([]string, 16)
	for i := range b {
		parts[i] = hex.EncodeToString(b[i : i+1])
	}
	return strings.Join(parts, " ")
}

var changeIDPattern = regexp.MustCompile(`^([0-9a-f]{2}(?: [0-9a-f]{2}){15})/([0-9]+)$`)

// ---- the VM's disks -------------------------------------------------------------------------

func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

func flatBacking(d *types.VirtualDisk) *types.VirtualDiskFlatVer2BackingInfo {
	b, _ := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	return b
}

func vmDisks(devices []types.BaseVirtualDevice) []*types.VirtualDisk {
	var out []*types.VirtualDisk
	for _, dev := range devices {
		if d, ok := dev.(*types.VirtualDisk); ok && flatBacking(d) != nil {
			out = append(out, d)
		}
	}
	return out
}

// parentChain builds the backing.parent chain above node.
func parentChain(ds *diskState, node string, like *types.VirtualDiskFlatVer2BackingInfo) *types.VirtualDiskFlatVer2BackingInfo {
	parent := ds.nodes[node]
	if parent == "" {
		return nil
	}
	b := &types.VirtualDiskFlatVer2BackingInfo{
		VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
			FileName:  parent,
			Datastore: like.Datastore,
		},
		DiskMode:        like.DiskMode,
		ThinProvisioned: like.ThinProvisioned,
		Uuid:            like.Uuid,
	}
	b.Parent = parentChain(ds, parent, like)
	return b
}

// capacityOf reads a disk's capacity, treating capacityInBytes and capacityInKB as one value:
// a client that edits only one of them (pyvmomi code often sets capacityInKB alone) wins over
// the stale other one; both are then set alike.
func capacityOf(d *types.VirtualDisk, known int64) int64 {
	c := diskCapacity(d)
	if known > 0 && d.CapacityInBytes == known && d.CapacityInKB*1024 != known && d.CapacityInKB > 0 {
		c = d.CapacityInKB * 1024
	}
	d.CapacityInBytes = c
	d.CapacityInKB = c / 1024
	return c
}

// reconcileVM brings our view of one VM in line with the simulator's after a call: new disks
// get files, removed snapshots are consolidated, new snapshots are frozen, CBT and capacity
// changes start or end epochs. Called with s.mu held.
func (s *server) reconcileVM(vm *simulator.VirtualMachine) error {
	var err error
	simulator.Map.WithLock(vm, func() { err = s.reconcileLocked(vm) })
	return err
}

func (s *server) reconcileLocked(vm *simulator.VirtualMachine) error {
	if vm.Config == nil {
		return nil
	}
	st := s.vms[vm.Self]
	if st == nil {
		st = &vmState{ref: vm.Self, disks: map[int32]*diskState{}, snaps: map[types.ManagedObjectReference]*snapState{}}
		s.vms[vm.Self] = st
	}
	cbt := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	seen := map[int32]bool{}
	changed := false
	for _, d := range vmDisks(vm.Config.Hardware.Device) {
		b := flatBacking(d)
		seen[d.Key] = true
		ds := st.disks[d.Key]
		if ds == nil {
			ds = &diskState{key: d.Key, nodes: map[string]string{}, records: map[string]*cbtRecord{}}
			st.disks[d.Key] = ds
		}
		if _, ok := ds.nodes[b.FileName]; !ok || ds.current != b.FileName {
			// a new disk, or one whose backing the client replaced
			if _, ok := ds.nodes[b.FileName]; !ok {
				parent := ""
				if b.Parent != nil {
					parent = b.Parent.FileName
				}
				ds.nodes[b.FileName] = parent
			}
			ds.current = b.FileName
		}
		capacity := capacityOf(d, ds.capacity)
		if ds.capacity != 0 && capacity != ds.capacity {
			ds.epoch, ds.records = "", map[string]*cbtRecord{} // a resized disk: its changeIds end
		}
		ds.capacity = capacity
		if err := ensureDiskFiles(b.FileName, capacity, ds.nodes[b.FileName]); err != nil {
			return err
		}
		if !cbt && (ds.epoch != "" || b.ChangeId != "") {
			ds.epoch, ds.records = "", map[string]*cbtRecord{}
			b.ChangeId = ""
			changed = true
		}
		if cbt && ds.epoch == "" {
			ds.epoch, ds.seq = newEpoch(), 0
			if b.ChangeId != "" {
				b.ChangeId = "" // a changeId of the ended epoch
				changed = true
			}
		}
	}
	for key := range st.disks {
		if !seen[key] && !snapsUse(st, key) {
			delete(st.disks, key)
		}
	}
	st.cbt = cbt

	// snapshots: removed ones first (consolidate), then new ones (freeze)
	inTree := map[types.ManagedObjectReference]bool{}
	if vm.Snapshot != nil {
		for _, ref := range allSnapshots(vm.Snapshot.RootSnapshotList) {
			inTree[ref] = true
		}
	}
	var removed []types.ManagedObjectReference
	for ref := range st.snaps {
		if !inTree[ref] {
			removed = append(removed, ref)
		}
	}
	sort.Slice(removed, func(i, j int) bool { return removed[i].Value < removed[j].Value })
	for _, ref := range removed {
		if err := s.consolidate(vm, st, ref); err != nil {
			return err
		}
		changed = true
	}
	if vm.Snapshot != nil {
		for _, ref := range allSnapshots(vm.Snapshot.RootSnapshotList) {
			if st.snaps[ref] == nil {
				if err := s.freeze(vm, st, ref); err != nil {
					return err
				}
				changed = true
			}
		}
	}
	if changed {
		s.rebuildBackings(vm, st)
	}
	return nil
}

func snapsUse(st *vmState, key int32) bool {
	for _, ss := range st.snaps {
		if _, ok := ss.disks[key]; ok {
			return true
		}
	}
	return false
}

func allSnapshots(tree []types.VirtualMachineSnapshotTree) []types.ManagedObjectReference {
	var out []types.ManagedObjectReference
	for _, t := range tree {
		out = append(out, t.Snapshot)
		out = append(out, allSnapshots(t.ChildSnapshotList)...)
	}
	return out
}

func snapshotObject(ref types.ManagedObjectReference) *simulator.VirtualMachineSnapshot {
	so, _ := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	return so
}

// freeze makes a new snapshot's disks the VM's current nodes of this instant and moves the VM
// to new child nodes with a copy of them.
func (s *server) freeze(vm *simulator.VirtualMachine, st *vmState, ref types.ManagedObjectReference) error {
	so := snapshotObject(ref)
	ss := &snapState{disks: map[int32]string{}}
	st.snaps[ref] = ss
	if so == nil {
		return nil
	}
	// 0.24.2 copies vm.Config shallowly: give the snapshot its own device list, so that the
	// VM's later changes (new file names, changeIds) do not show through it
	snapDevices := make([]types.BaseVirtualDevice, len(so.Config.Hardware.Device))
	copy(snapDevices, so.Config.Hardware.Device)
	for i, dev := range snapDevices {
		d, ok := dev.(*types.VirtualDisk)
		if !ok || flatBacking(d) == nil {
			continue
		}
		ds := st.disks[d.Key]
		if ds == nil {
			continue
		}
		vb := flatBacking(d) // the VM's backing (shared pointer)
		if strings.HasPrefix(vb.DiskMode, "independent") {
			// independent disks are not part of snapshots: the snapshot names the live disk
			sd := *d
			sb := *vb
			sb.ChangeId = ""
			sd.Backing = &sb
			snapDevices[i] = &sd
			continue
		}
		frozen := ds.current
		child, err := nextDeltaName(ds, frozen)
		if err != nil {
			return err
		}
		fsrc, _ := localFlat(frozen)
		fdst, err := localFlat(child)
		if err != nil {
			return err
		}
		if err := copySparse(fsrc, fdst, "snapshot_copy"); err != nil {
			return fmt.Errorf("snapshot copy of %s: %w", frozen, err)
		}
		if err := writeDescriptor(child, ds.capacity, frozen); err != nil {
			return err
		}
		cid := ""
		if st.cbt && ds.epoch != "" {
			hashes, err := s.hashFile(fsrc, ds.capacity, "snapshot_hash")
			if err != nil {
				return err
			}
			ds.seq++
			cid = fmt.Sprintf("%s/%d", ds.epoch, ds.seq)
			ds.records[cid] = &cbtRecord{seq: ds.seq, capacity: ds.capacity, hashes: hashes}
			dropOldRecords(ds)
		}
		ds.nodes[child] = frozen
		ds.current = child
		ss.disks[d.Key] = frozen

		sd := *d
		sb := *vb
		sb.FileName = frozen
		sb.ChangeId = cid
		sd.Backing = &sb
		snapDevices[i] = &sd

		vb.FileName = child
		vb.ChangeId = cid
	}
	so.Config.Hardware.Device = snapDevices
	if so.Config.ChangeTrackingEnabled != nil {
		v := *so.Config.ChangeTrackingEnabled
		so.Config.ChangeTrackingEnabled = &v
	}
	return nil
}

func dropOldRecords(ds *diskState) {
	for len(ds.records) > maxRecords {
		oldest, seq := "", -1
		for id, r := range ds.records {
			if seq < 0 || r.seq < seq {
				oldest, seq = id, r.seq
			}
		}
		delete(ds.records, oldest)
	}
}

// consolidate handles a snapshot that the simulator removed: its node takes the contents of
// its only child, or goes if nothing uses it.
func (s *server) consolidate(vm *simulator.VirtualMachine, st *vmState, ref types.ManagedObjectReference) error {
	defer addCost("consolidate", time.Now(), nil)
	ss := st.snaps[ref]
	delete(st.snaps, ref)
	for key, node := range ss.disks {
		ds := st.disks[key]
		if ds == nil {
			continue
		}
		var children []string
		for n, p := range ds.nodes {
			if p == node {
				children = append(children, n)
			}
		}
		switch len(children) {
		case 0:
			if ds.current != node && !nodeFrozen(st, key, node) {
				removeNode(ds, node)
			}
		case 1:
			c := children[0]
			if nodeFrozen(st, key, node) {
				continue
			}
			cf, _ := localFlat(c)
			nf, err := localFlat(node)
			if err != nil {
				return err
			}
			if err := os.Rename(cf, nf); err != nil {
				return fmt.Errorf("consolidating %s into %s: %w", c, node, err)
			}
			if lp, err := localPath(c); err == nil {
				os.Remove(lp)
			}
			for n, p := range ds.nodes {
				if p == c {
					ds.nodes[n] = node
					_ = writeDescriptor(n, ds.capacity, node)
				}
			}
			delete(ds.nodes, c)
			if ds.current == c {
				ds.current = node
			}
			for _, other := range st.snaps {
				if other.disks[key] == c {
					other.disks[key] = node
				}
			}
		}
	}
	return nil
}

func nodeFrozen(st *vmState, key int32, node string) bool {
	for _, ss := range st.snaps {
		if ss.disks[key] == node {
			return true
		}
	}
	return false
}

func removeNode(ds *diskState, node string) {
	if lp, err := localPath(node); err == nil {
		os.Remove(lp)
	}
	if fp, err := localFlat(node); err == nil {
		os.Remove(fp)
	}
	delete(ds.nodes, node)
}

// revert puts the VM on a new child of the snapshot's nodes, with a copy of their contents.
func (s *server) revert(vm *simulator.VirtualMachine, ref types.ManagedObjectReference) error {
	var err error
	simulator.Map.WithLock(vm, func() {
		st := s.vms[vm.Self]
		if st == nil || st.snaps[ref] == nil {
			return
		}
		for key, node := range st.snaps[ref].disks {
			ds := st.disks[key]
			if ds == nil {
				continue
			}
			old := ds.current
			var child string
			if child, err = nextDeltaName(ds, node); err != nil {
				return
			}
			src, _ := localFlat(node)
			dst, _ := localFlat(child)
			if err = copySparse(src, dst, "revert_copy"); err != nil {
				return
			}
			if err = writeDescriptor(child, ds.capacity, node); err != nil {
				return
			}
			ds.nodes[child] = node
			ds.current = child
			used := nodeFrozen(st, key, old)
			for _, p := range ds.nodes {
				if p == old {
					used = true
				}
			}
			if !used {
				removeNode(ds, old)
			}
		}
		s.rebuildBackings(vm, st)
	})
	return err
}

// rebuildBackings writes our chains into the VM's and its snapshots' disk backings.
func (s *server) rebuildBackings(vm *simulator.VirtualMachine, st *vmState) {
	for _, d := range vmDisks(vm.Config.Hardware.Device) {
		ds := st.disks[d.Key]
		if ds == nil {
			continue
		}
		b := flatBacking(d)
		b.FileName = ds.current
		b.Parent = parentChain(ds, ds.current, b)
	}
	for ref, ss := range st.snaps {
		so := snapshotObject(ref)
		if so == nil {
			continue
		}
		for _, d := range vmDisks(so.Config.Hardware.Device) {
			ds := st.disks[d.Key]
			node, ok := ss.disks[d.Key]
			if ds == nil || !ok {
				continue
			}
			b := flatBacking(d)
			b.FileName = node
			b.Parent = parentChain(ds, node, b)
		}
	}
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "config.hardware.device", Val: vm.Config.Hardware.Device},
	})
}

// ---- QueryChangedDiskAreas ----------------------------------------------------------------

type qcdaError struct {
	msg   string
	fault types.BaseMethodFault
}

func invalidArg(prop, msg string) *qcdaError {
	return &qcdaError{"A specified parameter was not correct: " + prop + " (" + msg + ")",
		&types.InvalidArgument{InvalidProperty: prop}}
}

func fileFault(file, msg string) *qcdaError {
	return &qcdaError{"Error caused by file " + file + ": " + msg,
		&types.FileFault{File: file}}
}

// queryChangedDiskAreas implements the vSphere API's VirtualMachine.QueryChangedDiskAreas.
// Called with s.mu held.
func (s *server) queryChangedDiskAreas(vm *simulator.VirtualMachine, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *qcdaError) {
	defer addCost("changed_areas", time.Now(), nil)
	if err := s.reconcileVM(vm); err != nil {
		return nil, &qcdaError{err.Error(), &types.SystemError{Reason: err.Error()}}
	}
	var res *types.DiskChangeInfo
	var qerr *qcdaError
	simulator.Map.WithLock(vm, func() { res, qerr = s.qcdaLocked(vm, req) })
	return res, qerr
}

func (s *server) qcdaLocked(vm *simulator.VirtualMachine, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *qcdaError) {
	st := s.vms[vm.Self]
	var devices []types.BaseVirtualDevice
	var node string
	if req.Snapshot != nil {
		ss := st.snaps[*req.Snapshot]
		so := snapshotObject(*req.Snapshot)
		if ss == nil || so == nil || so.Vm != vm.Self {
			return nil, &qcdaError{"snapshot " + req.Snapshot.Value + " not found on " + vm.Name,
				&types.NotFound{}}
		}
		devices = so.Config.Hardware.Device
		node = ss.disks[req.DeviceKey]
	} else {
		// the API: "using the current state only works if the virtual machine is powered off"
		if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
			return nil, &qcdaError{"a powered-on virtual machine needs a snapshot",
				&types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOff,
					ExistingState: vm.Runtime.PowerState}}
		}
		devices = vm.Config.Hardware.Device
		if ds := st.disks[req.DeviceKey]; ds != nil {
			node = ds.current
		}
	}
	var disk *types.VirtualDisk
	for _, d := range vmDisks(devices) {
		if d.Key == req.DeviceKey {
			disk = d
		}
	}
	ds := st.disks[req.DeviceKey]
	if disk == nil || ds == nil {
		return nil, invalidArg("deviceKey", fmt.Sprintf("no virtual disk with key %d", req.DeviceKey))
	}
	if node == "" {
		return nil, fileFault(disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).FileName,
			"an independent disk is not part of the snapshot")
	}
	capacity := diskCapacity(disk)
	targetID := flatBacking(disk).ChangeId
	flat := flatName(node)
	if req.Snapshot == nil {
		targetID = "" // computed from the live contents below
	}
	if req.Snapshot != nil && targetID == "" {
		return nil, fileFault(flat, "change tracking was not enabled for this disk when the snapshot was taken")
	}
	if req.Snapshot == nil && (!st.cbt || ds.epoch == "") {
		return nil, fileFault(flat, "change tracking is not enabled for this disk")
	}
	if req.StartOffset < 0 || req.StartOffset > capacity {
		return nil, invalidArg("startOffset", fmt.Sprintf("%d is outside the disk (%d bytes)", req.StartOffset, capacity))
	}
	start := req.StartOffset
	end := start + s.span
	if end > capacity {
		end = capacity
	}
	info := &types.DiskChangeInfo{StartOffset: start}
	if start == capacity {
		return info, nil
	}
	lflat, err := localFlat(node)
	if err != nil {
		return nil, fileFault(flat, err.Error())
	}
	var areas []types.DiskChangeExtent
	if req.ChangeId == "*" {
		areas, err = s.allocatedAreas(lflat, start, end, capacity)
		if err != nil {
			return nil, fileFault(flat, err.Error())
		}
	} else {
		m := changeIDPattern.FindStringSubmatch(req.ChangeId)
		if m == nil {
			return nil, invalidArg("changeId", fmt.Sprintf("%q is not a changeId", req.ChangeId))
		}
		if m[1] != ds.epoch || (targetID != "" && !strings.HasPrefix(targetID, ds.epoch+"/")) {
			return nil, invalidArg("changeId", "change tracking of this disk was reset (turned off, or the disk resized) since "+req.ChangeId)
		}
		base := ds.records[req.ChangeId]
		if base == nil {
			return nil, fileFault(flat, "no change tracking data for changeId "+req.ChangeId)
		}
		var cur []uint64
		if targetID != "" {
			r := ds.records[targetID]
			if r == nil {
				return nil, fileFault(flat, "no change tracking data for the snapshot's changeId "+targetID)
			}
			if seq, _ := strconv.Atoi(m[2]); seq > r.seq {
				return nil, fileFault(flat, "changeId "+req.ChangeId+" is newer than the snapshot")
			}
			cur = r.hashes
		} else if cur, err = s.hashFile(lflat, capacity, "live_hash"); err != nil {
			return nil, fileFault(flat, err.Error())
		}
		if base.capacity != capacity || len(base.hashes) != len(cur) {
			return nil, fileFault(flat, "the disk changed size since "+req.ChangeId)
		}
		areas = s.changedAreas(base.hashes, cur, start, end)
	}
	if len(areas) > s.maxAreas {
		areas = areas[:s.maxAreas]
		last := areas[len(areas)-1]
		end = last.Start + last.Length
	}
	info.Length = end - start
	info.ChangedArea = areas
	return info, nil
}

func (s *server) appendArea(areas []types.DiskChangeExtent, a, b, start, end int64) []types.DiskChangeExtent {
	if a < start {
		a = start
	}
	if b > end {
		b = end
	}
	if a >= b {
		return areas
	}
	if n := len(areas); n > 0 && areas[n-1].Start+areas[n-1].Length >= a {
		if e := areas[n-1].Start + areas[n-1].Length; b > e {
			areas[n-1].Length = b - areas[n-1].Start
		}
		return areas
	}
	return append(areas, types.DiskChangeExtent{Start: a, Length: b - a})
}

func (s *server) changedAreas(old, cur []uint64, start, end int64) []types.DiskChangeExtent {
	var areas []types.DiskChangeExtent
	for g := start / s.granule; g*s.granule < end && g < int64(len(cur)); g++ {
		if old[g] != cur[g] {
			areas = s.appendArea(areas, g*s.granule, (g+1)*s.granule, start, end)
		}
	}
	return areas
}

func (s *server) allocatedAreas(flat string, start, end, capacity int64) ([]types.DiskChangeExtent, error) {
	f, err := os.Open(flat)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var areas []types.DiskChangeExtent
	from := start / s.granule * s.granule
	err = dataExtents(f, from, end, func(a, b int64) error {
		a = a / s.granule * s.granule
		b = (b + s.granule - 1) / s.granule * s.granule
		areas = s.appendArea(areas, a, b, start, end)
		return nil
	})
	return areas, err
}
