// Command vcsim is alike's launcher for govmomi's vCenter simulator, the peer that the vmware:
// source is tested against. It is built by tests/vcsim/build.sh from Debian's
// golang-github-vmware-govmomi-dev 0.24.2 (GO111MODULE=off, no Go module downloads).
//
// It starts simulator.VPX() - datacenter DC0, cluster DC0_C0 (3 hosts, pool Resources),
// standalone host DC0_H0, datastore LocalDS_0, VMs DC0_H0_VM0, DC0_H0_VM1, DC0_C0_RP0_VM0 and
// DC0_C0_RP0_VM1 (powered on), a DVS, a portgroup, and the vAPI REST endpoints (/rest: sessions,
// tagging, content libraries) - on 127.0.0.1, over HTTPS with a certificate of its own (or
// plain HTTP with -http), with one fixed username and password, prints one JSON line:
//
//	{"url": "https://127.0.0.1:PORT/sdk", "host": ..., "port": ..., "scheme": ..., "username": ...,
//	 "password": ..., "cert_file": "<dir>/cert.pem" or "", "datacenter": "DC0",
//	 "datastores": {"LocalDS_0": "<local folder>"}, "vms": [...], "granule": 65536,
//	 "cbt_span": ..., "cbt_max_areas": ..., "dir": ..., "pid": ...}
//
// and serves until SIGTERM or SIGINT (or, with -exit-on-stdin-eof, until its stdin closes).
//
// THE SIMULATOR'S OWN (govmomi 0.24.2, unchanged): the whole SOAP API it implements - sessions
// (Login, Logout, SessionIsActive; InvalidLogin for a wrong password, NotAuthenticated without a
// session), the inventory and PropertyCollector/ContainerView, CreateVM_Task, CloneVM_Task,
// ReconfigVM_Task (including config.changeTrackingEnabled and disk edits), PowerOnVM_Task,
// PowerOffVM_Task, Destroy_Task, CreateSnapshot_Task, RemoveSnapshot_Task,
// RemoveAllSnapshots_Task, RevertToSnapshot_Task, tasks, events, custom fields
// (CustomFieldsManager, SetCustomValue), the vAPI tagging REST API under /rest, and the datastore
// HTTP interface /folder/<path>?dcPath=<dc>&dsName=<ds>: GET and HEAD through Go's
// http.FileServer (so Range requests, single and multiple, answer 206 as HTTP says), PUT and POST
// writing the file. Datastores are real folders (the simulator makes one temporary folder per
// datastore; this launcher puts them under -dir): a disk "[LocalDS_0] VM/disk1.vmdk" is the
// descriptor <folder>/VM/disk1.vmdk and its data <folder>/VM/disk1-flat.vmdk.
//
// ADDED BY ALIKE (this file and disks.go), following the vSphere API reference:
//
//   - VirtualMachine.QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId), which
//     0.24.2 lacks (MethodNotFound): a DiskChangeInfo{startOffset, length, changedArea[]} whose
//     areas are the granules (-granule, 64 KiB) whose contents really differ between the instant
//     of changeId and the snapshot; changeId "*" gives the allocated areas of the snapshot's disk.
//     One answer covers at most -cbt-span bytes and -cbt-max-areas areas: the client loops on
//     startOffset = startOffset + length until the disk's capacity, as the API requires. Faults:
//     InvalidArgument(changeId) for a malformed changeId or one of an epoch that ended (CBT
//     turned off and on again, or the disk resized); FileFault for a changeId with no data (too
//     old, or newer than the snapshot) or a snapshot taken without CBT; NotFound for a snapshot
//     of another VM; InvalidArgument(deviceKey / startOffset); InvalidPowerState when no
//     snapshot is given and the VM is powered on; NotAuthenticated without a session (the
//     simulator's own dispatch answers that: the call is routed to a per-VM object of ours).
//
//   - backing.changeId (VirtualDiskFlatVer2BackingInfo) set at each snapshot of a VM whose
//     config.changeTrackingEnabled is true, in the snapshot's config and the VM's current disk.
//
//   - Snapshots that freeze disk contents (0.24.2 never touches disk files at a snapshot): the
//     snapshot's disk is the VM's disk of that instant and is not written again; the VM moves to
//     "<base>-00000N.vmdk" (a full -flat copy, where vSphere has a sparse delta); removing
//     snapshots consolidates back (removing the only snapshot puts the VM back on disk1.vmdk);
//     reverting copies the snapshot's contents to a new current disk; independent disks are
//     left out of snapshots. See disks.go.
//
//   - Disk files of capacity size: 0.24.2 creates empty descriptor and -flat files; the launcher
//     writes a monolithic-flat descriptor and sizes -flat (sparse) to the disk's capacity after
//     every task (CreateVM_Task, ReconfigVM_Task growing a disk, ...) and after a PUT.
//
//   - The model's disks are -disk-mb big (0.24.2: 1 MiB), DC0_H0_VM0 has a second disk
//     (disk2.vmdk, -second-disk-mb), and with -seed each model disk holds some data (256 KiB at
//     offset 0 and 1 MiB at the middle; read it through /folder, do not rely on its pattern).
//
//   - /folder asks for authentication as vCenter does (-folder-auth, on by default): the
//     session's cookie (vmware_soap_session) or HTTP basic auth with the username and password;
//     else 401. A PUT onto a disk file that a snapshot holds (any node of a chain that is not a
//     VM's current disk) is refused with 409, as a locked file would be.
//
//   - Guest writes for tests: PUT /alike/write?vm=<name or moref>&disk=<device key>&offset=<n>
//     writes the request body into the VM's CURRENT disk (whatever file that is after
//     snapshots); GET /alike/disks?vm=<name> lists each disk's device key, capacity, current
//     file and chain, and each snapshot's frozen file, as JSON. No authentication (loopback,
//     tests only).
//
//   - GET /alike/stats: what the launcher's own work has cost since it started, as JSON
//     {"costs": {NAME: {"calls", "seconds", "bytes"}}}, for benchmarks that report apart what a
//     real vCenter does not spend: "snapshot_copy" (the -flat copy of each frozen disk at
//     CreateSnapshot_Task; bytes copied), "snapshot_hash" (the content-hash pass of the frozen
//     disk at a snapshot with CBT on; bytes read), "consolidate" (snapshot removal: a rename),
//     "changed_areas" (QueryChangedDiskAreas calls, comparing kept hashes), "live_hash" (the hash
//     pass of QueryChangedDiskAreas without a snapshot), "revert_copy", and "after_task" (all the
//     launcher's work after a task, the above included). A name appears after its first call.
//     No authentication (loopback, tests only).
//
//   - A Fetch of an unset property (pyvmomi's vm.snapshot on a VM without snapshots) answers
//     "unset": 0.24.2 panics on it and closes the connection. Any other panic of the simulator
//     answers a SystemError fault.
//
//   - Tasks of a snapshot (RemoveSnapshot_Task, RevertToSnapshot_Task) name the VM in
//     info.entity, as vCenter does: 0.24.2 names the snapshot, which is no ManagedEntity, and
//     pyvmomi's WaitForTask fails reading it (TypeError).
//
// Not done (as in 0.24.2): layoutEx is not rebuilt for the chains; resizing a disk that has
// snapshots is accepted (vSphere refuses it); the vAPI /rest session accepts any non-empty
// username and password.
package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"encoding/xml"
	"flag"
	"fmt"
	"hash/fnv"
	"hash/maphash"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator" // the vAPI REST endpoints (tagging)
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type server struct {
	// mu serializes every task (with what we do after it), QueryChangedDiskAreas, guest writes
	// and PUTs: a snapshot's copy is of one instant
	mu       sync.Mutex
	vms      map[types.ManagedObjectReference]*vmState
	granule  int64
	span     int64
	maxAreas int
	noQCDA   bool // -no-changed-areas: QueryChangedDiskAreas left to the simulator (MethodNotFound)
	seed     maphash.Seed

	inner      http.Handler
	username   string
	password   string
	folderAuth bool

	authMu    sync.Mutex
	authCache map[string]time.Time
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0: any free port, printed)")
	plain := flag.Bool("http", false, "plain HTTP instead of HTTPS")
	username := flag.String("username", "alike", "the one username that logs in")
	password := flag.String("password", "alike-vcsim", "its password")
	dir := flag.String("dir", "", "state folder: datastores, cert.pem (default: a temporary one, removed at exit)")
	diskMB := flag.Int64("disk-mb", 64, "capacity of the model VMs' disks, MiB")
	secondMB := flag.Int64("second-disk-mb", 16, "capacity of DC0_H0_VM0's second disk, MiB (0: none)")
	seed := flag.Bool("seed", true, "write some data into the model VMs' disks")
	granule := flag.Int64("granule", 64<<10, "CBT granule, bytes")
	span := flag.Int64("cbt-span", 256<<20, "at most this many bytes covered by one QueryChangedDiskAreas answer")
	maxAreas := flag.Int("cbt-max-areas", 1024, "at most this many areas in one QueryChangedDiskAreas answer")
	folderAuth := flag.Bool("folder-auth", true, "/folder needs the session cookie or basic auth, as vCenter")
	stdinEOF := flag.Bool("exit-on-stdin-eof", false, "exit when stdin closes (the parent died)")
	trace := flag.Bool("trace", false, "SOAP traffic to stderr")
	noQCDA := flag.Bool("no-changed-areas", false, "answer QueryChangedDiskAreas as the unmodified simulator does (MethodNotFound): an older server")
	flag.Parse()
	log.SetPrefix("vcsim: ")
	if *granule <= 0 || *span < *granule || *maxAreas < 1 {
		log.Fatal("bad -granule / -cbt-span / -cbt-max-areas")
	}

	stateDir, temporary := *dir, false
	if stateDir == "" {
		d, err := os.MkdirTemp("", "alike-vcsim-")
		if err != nil {
			log.Fatal(err)
		}
		stateDir, temporary = d, true
	}
	stateDir, _ = filepath.Abs(stateDir)
	dsRoot := filepath.Join(stateDir, "datastores")
	if err := os.MkdirAll(dsRoot, 0o700); err != nil {
		log.Fatal(err)
	}
	// the simulator makes each datastore with ioutil.TempDir("", ...): under TMPDIR
	os.Setenv("TMPDIR", dsRoot)
	simulator.Trace = *trace

	s := &server{
		vms: map[types.ManagedObjectReference]*vmState{}, granule: *granule, span: *span,
		maxAreas: *maxAreas, noQCDA: *noQCDA, seed: maphash.MakeSeed(), username: *username, password: *password,
		folderAuth: *folderAuth, authCache: map[string]time.Time{},
	}

	m := simulator.VPX()
	if err := m.Create(); err != nil {
		log.Fatal(err)
	}
	if err := s.customize(m, *diskMB<<20, *secondMB<<20, *seed); err != nil {
		log.Fatal(err)
	}

	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	m.Service.RegisterEndpoints = true
	certFile := ""
	if !*plain {
		cert, err := makeCert(stateDir)
		if err != nil {
			log.Fatal(err)
		}
		m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		certFile = filepath.Join(stateDir, "cert.pem")
	}
	srv := m.Service.NewServer()
	// our handler in front of the simulator's (before anyone knows the port)
	s.inner = srv.Config.Handler
	srv.Config.Handler = s

	u := *srv.URL
	u.User = nil
	host, port, _ := net.SplitHostPort(u.Host)
	portN, _ := strconv.Atoi(port)
	dss := map[string]string{}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		dss[ds.Name] = ds.Info.GetDatastoreInfo().Url
	}
	var vms []string
	for _, e := range simulator.Map.All("VirtualMachine") {
		vms = append(vms, e.(*simulator.VirtualMachine).Name)
	}
	sort.Strings(vms)
	line, _ := json.Marshal(map[string]interface{}{
		"url": u.String(), "host": host, "port": portN, "scheme": u.Scheme,
		"username": *username, "password": *password, "cert_file": certFile,
		"datacenter": "DC0", "datastores": dss, "vms": vms,
		"granule": *granule, "cbt_span": *span, "cbt_max_areas": *maxAreas,
		"folder_auth": *folderAuth, "dir": stateDir, "pid": os.Getpid(),
	})
	os.Stdout.Write(append(line, '\n'))

	done := make(chan os.Signal, 2)
	signal.Notify(done, syscall.SIGTERM, syscall.SIGINT)
	if *stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			done <- syscall.SIGTERM
		}()
	}
	<-done
	go func() { srv.Close() }()
	time.Sleep(200 * time.Millisecond)
	m.Remove()
	if temporary {
		os.RemoveAll(stateDir)
	}
}

// customize resizes the model's disks, adds DC0_H0_VM0's second disk, gives every disk its
// files and (seed) some data.
func (s *server) customize(m *simulator.Model, diskBytes, secondBytes int64, seed bool) error {
	ctx := context.Background()
	c, err := vim25.NewClient(ctx, m.Service)
	if err != nil {
		return err
	}
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		simulator.Map.WithLock(vm, func() {
			for _, d := range vmDisks(vm.Config.Hardware.Device) {
				d.CapacityInBytes = diskBytes
				d.CapacityInKB = diskBytes / 1024
			}
		})
		if vm.Name == "DC0_H0_VM0" && secondBytes > 0 {
			ovm := object.NewVirtualMachine(c, vm.Self)
			devices, err := ovm.Device(ctx)
			if err != nil {
				return err
			}
			ctl, err := devices.FindDiskController("")
			if err != nil {
				return err
			}
			ds := simulator.Map.Any("Datastore").(*simulator.Datastore)
			disk := devices.CreateDisk(ctl, ds.Self, fmt.Sprintf("[%s] %s/disk2.vmdk", ds.Name, vm.Name))
			disk.CapacityInKB = secondBytes / 1024
			disk.CapacityInBytes = secondBytes
			if err := ovm.AddDevice(ctx, disk); err != nil {
				return fmt.Errorf("second disk: %w", err)
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.reconcileAll(); err != nil {
		return err
	}
	if !seed {
		return nil
	}
	for _, st := range s.vms {
		vm := simulator.Map.Get(st.ref).(*simulator.VirtualMachine)
		for key, ds := range st.disks {
			h := fnv.New64a()
			fmt.Fprintf(h, "%s/%d", vm.Name, key)
			x := h.Sum64() // a pattern of its own per VM and disk
			fill := func(off, n int64) error {
				if off+n > ds.capacity {
					n = ds.capacity - off
				}
				buf := make([]byte, n)
				for i := 0; i+8 <= len(buf); i += 8 {
					x += 0x9e3779b97f4a7c15 // splitmix64
					z := x
					z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
					z = (z ^ (z >> 27)) * 0x94d049bb133111eb
					z ^= z >> 31
					for j := 0; j < 8; j++ {
						buf[i+j] = byte(z >> (8 * j))
					}
				}
				return s.writeCurrent(ds, off, buf)
			}
			if err := fill(0, 256<<10); err != nil {
				return err
			}
			if err := fill(ds.capacity/2/s.granule*s.granule, 1<<20); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *server) writeCurrent(ds *diskState, off int64, data []byte) error {
	if off < 0 || off+int64(len(data)) > ds.capacity {
		return fmt.Errorf("write of %d bytes at %d is outside the disk (%d bytes)", len(data), off, ds.capacity)
	}
	fp, err := localFlat(ds.current)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(fp, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(data, off); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// reconcileAll runs reconcileVM for every VM and forgets the VMs that are gone. s.mu held.
func (s *server) reconcileAll() error {
	present := map[types.ManagedObjectReference]bool{}
	var firstErr error
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		present[vm.Self] = true
		if err := s.reconcileVM(vm); err != nil && firstErr == nil {
			firstErr = fmt.Errorf("%s: %w", vm.Name, err)
		}
	}
	for ref := range s.vms {
		if !present[ref] {
			delete(s.vms, ref)
		}
	}
	return firstErr
}

// ---- HTTP --------------------------------------------------------------------------------

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch p := r.URL.Path; {
	case (p == "/sdk" || p == "/sdk/vimService") && r.Method == http.MethodPost:
		s.serveSOAP(w, r)
	case strings.HasPrefix(p, "/folder/"):
		s.serveFolder(w, r)
	case p == "/alike/write":
		s.serveWrite(w, r)
	case p == "/alike/disks":
		s.serveDisks(w, r)
	case p == "/alike/stats":
		jsonReply(w, http.StatusOK, map[string]interface{}{"costs": costSnapshot()})
	default:
		s.inner.ServeHTTP(w, r)
	}
}

// soapCall finds the method and its _this in a SOAP request.
func soapCall(body []byte) (method string, this types.ManagedObjectReference) {
	dec := xml.NewDecoder(bytes.NewReader(body))
	inBody := false
	for {
		tok, err := dec.Token()
		if err != nil {
			return
		}
		se, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		switch {
		case !inBody:
			inBody = se.Name.Local == "Body"
		case method == "":
			method = se.Name.Local
		default:
			if se.Name.Local == "_this" {
				for _, a := range se.Attr {
					if a.Name.Local == "type" {
						this.Type = a.Value
					}
				}
				var v string
				_ = dec.DecodeElement(&v, &se)
				this.Value = strings.TrimSpace(v)
			}
			return
		}
	}
}

var thisElement = regexp.MustCompile(`<(?:[A-Za-z0-9_]+:)?_this\b[^>]*>[^<]*</(?:[A-Za-z0-9_]+:)?_this>`)
var taskReturn = regexp.MustCompile(`<returnval[^>]*>(task-[^<]+)</returnval>`)

// changeTracker receives a VM's QueryChangedDiskAreas: the launcher rewrites the call's _this
// to it, so that the simulator's own dispatch checks the session and encodes answer and faults.
type changeTracker struct {
	Self types.ManagedObjectReference
	vm   types.ManagedObjectReference
	s    *server
}

func (t *changeTracker) Reference() types.ManagedObjectReference { return t.Self }

func (t *changeTracker) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	vm, ok := simulator.Map.Get(t.vm).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: t.vm})
		return body
	}
	req.This = t.vm
	t.s.mu.Lock()
	info, qerr := t.s.queryChangedDiskAreas(vm, req)
	t.s.mu.Unlock()
	if qerr != nil {
		body.Fault_ = simulator.Fault(qerr.msg, qerr.fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

func (s *server) serveSOAP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	r.Body.Close()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	method, this := soapCall(body)
	forward := func(b []byte) (rec *httptest.ResponseRecorder) {
		r2 := r.Clone(r.Context())
		r2.Body = io.NopCloser(bytes.NewReader(b))
		r2.ContentLength = int64(len(b))
		rec = httptest.NewRecorder()
		defer func() {
			if p := recover(); p != nil {
				rec = panicReply(method, p)
			}
		}()
		s.inner.ServeHTTP(rec, r2)
		return rec
	}
	var rec *httptest.ResponseRecorder
	switch {
	case method == "QueryChangedDiskAreas" && this.Type == "VirtualMachine" && !s.noQCDA:
		if _, ok := simulator.Map.Get(this).(*simulator.VirtualMachine); ok {
			ref := types.ManagedObjectReference{Type: "AlikeChangeTracker", Value: "alike-cbt-" + this.Value}
			if simulator.Map.Get(ref) == nil {
				simulator.Map.Put(&changeTracker{Self: ref, vm: this, s: s})
			}
			if loc := thisElement.FindIndex(body); loc != nil {
				repl := fmt.Sprintf(`<_this type="%s">%s</_this>`, ref.Type, ref.Value)
				body = append(append(append([]byte{}, body[:loc[0]]...), repl...), body[loc[1]:]...)
			}
		}
		rec = forward(body)
	case strings.HasSuffix(method, "_Task") || method == "UnregisterVM":
		s.mu.Lock()
		var snapVM *simulator.VirtualMachine
		if so := snapshotObject(this); so != nil {
			snapVM, _ = simulator.Map.Get(so.Vm).(*simulator.VirtualMachine)
		}
		rec = forward(body)
		s.afterTask(method, this, snapVM, rec)
		s.mu.Unlock()
	default:
		rec = forward(body)
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// afterTask brings disk files, snapshots and CBT in line with what the task did. s.mu held.
func (s *server) afterTask(method string, this types.ManagedObjectReference, snapVM *simulator.VirtualMachine, rec *httptest.ResponseRecorder) {
	defer addCost("after_task", time.Now(), nil)
	var task *simulator.Task
	if m := taskReturn.FindSubmatch(rec.Body.Bytes()); m != nil {
		task, _ = simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: string(m[1])}).(*simulator.Task)
	}
	if task != nil && snapVM != nil {
		// 0.24.2 gives a snapshot's tasks (RemoveSnapshot_Task, RevertToSnapshot_Task) the
		// snapshot as info.entity, which is no ManagedEntity: pyvmomi cannot read such a task.
		// vCenter names the VM there.
		simulator.Map.Update(task, []types.PropertyChange{
			{Name: "info.entity", Val: snapVM.Self},
			{Name: "info.entityName", Val: snapVM.Name},
		})
	}
	ok := task != nil && task.Info.State == types.TaskInfoStateSuccess
	err := s.reconcileAll()
	if err == nil && ok {
		switch method {
		case "RevertToSnapshot_Task":
			if so := snapshotObject(this); so != nil {
				if vm, found := simulator.Map.Get(so.Vm).(*simulator.VirtualMachine); found {
					err = s.revert(vm, this)
				}
			}
		case "RevertToCurrentSnapshot_Task":
			if vm, found := simulator.Map.Get(this).(*simulator.VirtualMachine); found && vm.Snapshot != nil && vm.Snapshot.CurrentSnapshot != nil {
				err = s.revert(vm, *vm.Snapshot.CurrentSnapshot)
			}
		}
	}
	if err != nil {
		log.Printf("after %s on %s: %v", method, this.Value, err)
		if task != nil { // the client has not seen the task yet: it fails, as vSphere's would
			simulator.Map.Update(task, []types.PropertyChange{
				{Name: "info.state", Val: types.TaskInfoStateError},
				{Name: "info.error", Val: &types.LocalizedMethodFault{
					Fault: &types.SystemError{Reason: err.Error()}, LocalizedMessage: err.Error()}},
			})
		}
	}
}

const envelope = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" ` +
	`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`

// panicReply answers a call that panicked in the simulator (0.24.2's Fetch of an unset property,
// e.g. pyvmomi's vm.snapshot on a VM without snapshots, indexes an empty list): Fetch gets the
// empty answer (the property is unset), anything else a SystemError fault instead of a
// connection closed without a response.
func panicReply(method string, p interface{}) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	rec.Header().Set("Content-Type", "text/xml; charset=utf-8")
	if method == "Fetch" {
		rec.WriteHeader(http.StatusOK)
		fmt.Fprintf(rec, envelope, `<FetchResponse xmlns="urn:vim25"></FetchResponse>`)
		return rec
	}
	log.Printf("%s panicked in the simulator: %v", method, p)
	var msg bytes.Buffer
	_ = xml.EscapeText(&msg, []byte(fmt.Sprintf("%s: %v", method, p)))
	rec.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(rec, envelope, `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>`+msg.String()+
		`</faultstring><detail><SystemErrorFault xmlns="urn:vim25" xsi:type="SystemError"><reason>`+msg.String()+
		`</reason></SystemErrorFault></detail></soapenv:Fault>`)
	return rec
}

const currentTimeRequest = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>` +
	`<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime>` +
	`</soapenv:Body></soapenv:Envelope>`

// authorized: basic auth with the username and password, or a live session's cookie (asked
// of the simulator itself with a CurrentTime call, which needs a session).
func (s *server) authorized(r *http.Request) bool {
	if u, p, ok := r.BasicAuth(); ok {
		return u == s.username && p == s.password
	}
	c, err := r.Cookie(soap.SessionCookieName)
	if err != nil || c.Value == "" {
		return false
	}
	s.authMu.Lock()
	t, ok := s.authCache[c.Value]
	s.authMu.Unlock()
	if ok && time.Since(t) < time.Second {
		return true
	}
	req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(currentTimeRequest))
	req.Header.Set("Content-Type", "text/xml")
	req.AddCookie(&http.Cookie{Name: soap.SessionCookieName, Value: c.Value})
	rec := httptest.NewRecorder()
	s.inner.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		return false
	}
	s.authMu.Lock()
	s.authCache[c.Value] = time.Now()
	s.authMu.Unlock()
	return true
}

// folderTarget maps a /folder URL to its datastore path "[ds] dir/file".
func folderTarget(r *http.Request) string {
	ds := r.URL.Query().Get("dsName")
	if ds == "" {
		if e := simulator.Map.Any("Datastore"); e != nil {
			ds = e.(*simulator.Datastore).Name
		}
	}
	return fmt.Sprintf("[%s] %s", ds, path.Clean(strings.TrimPrefix(r.URL.Path, "/folder/")))
}

func (s *server) serveFolder(w http.ResponseWriter, r *http.Request) {
	if s.folderAuth && !s.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
		http.Error(w, "authentication required: the vmware_soap_session cookie or basic auth", http.StatusUnauthorized)
		return
	}
	if r.Method != http.MethodPut && r.Method != http.MethodPost {
		s.inner.ServeHTTP(w, r)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	target := folderTarget(r)
	for _, st := range s.vms {
		for _, ds := range st.disks {
			for node := range ds.nodes {
				if node != ds.current && (target == node || target == flatName(node)) {
					http.Error(w, "file is locked: "+target+" is a disk of a snapshot", http.StatusConflict)
					return
				}
			}
		}
	}
	s.inner.ServeHTTP(w, r)
	// a -flat file uploaded shorter than its disk is still the disk's size
	for _, st := range s.vms {
		for _, ds := range st.disks {
			if target == flatName(ds.current) || target == ds.current {
				if err := ensureDiskFiles(ds.current, ds.capacity, ds.nodes[ds.current]); err != nil {
					log.Printf("after PUT %s: %v", target, err)
				}
			}
		}
	}
}

func (s *server) findVM(name string) *simulator.VirtualMachine {
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		if vm.Name == name || vm.Self.Value == name {
			return vm
		}
	}
	return nil
}

func jsonReply(w http.ResponseWriter, code int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *server) serveWrite(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPut && r.Method != http.MethodPost {
		jsonReply(w, http.StatusMethodNotAllowed, map[string]string{"error": "PUT the bytes"})
		return
	}
	q := r.URL.Query()
	vm := s.findVM(q.Get("vm"))
	if vm == nil {
		jsonReply(w, http.StatusNotFound, map[string]string{"error": "no VM " + q.Get("vm")})
		return
	}
	key, err1 := strconv.Atoi(q.Get("disk"))
	off, err2 := strconv.ParseInt(q.Get("offset"), 10, 64)
	if err1 != nil || err2 != nil {
		jsonReply(w, http.StatusBadRequest, map[string]string{"error": "disk=<device key>&offset=<bytes> needed"})
		return
	}
	data, err := io.ReadAll(r.Body)
	if err != nil {
		jsonReply(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.reconcileVM(vm); err != nil {
		jsonReply(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
		return
	}
	ds := s.vms[vm.Self].disks[int32(key)]
	if ds == nil {
		jsonReply(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("%s has no disk %d", vm.Name, key)})
		return
	}
	if err := s.writeCurrent(ds, off, data); err != nil {
		jsonReply(w, http.StatusRequestedRangeNotSatisfiable, map[string]string{"error": err.Error()})
		return
	}
	lf, _ := localFlat(ds.current)
	jsonReply(w, http.StatusOK, map[string]interface{}{
		"file": flatName(ds.current), "path": lf, "offset": off, "length": len(data)})
}

func (s *server) serveDisks(w http.ResponseWriter, r *http.Request) {
	vm := s.findVM(r.URL.Query().Get("vm"))
	if vm == nil {
		jsonReply(w, http.StatusNotFound, map[string]string{"error": "no VM " + r.URL.Query().Get("vm")})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.reconcileVM(vm); err != nil {
		jsonReply(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
		return
	}
	st := s.vms[vm.Self]
	type diskInfo struct {
		Key       int32             `json:"key"`
		Capacity  int64             `json:"capacity"`
		Current   string            `json:"current"`
		Flat      string            `json:"flat"`
		Path      string            `json:"path"`
		Chain     []string          `json:"chain"`
		Snapshots map[string]string `json:"snapshots"`
		CBTEpoch  string            `json:"cbt_epoch"`
		ChangeIds []string          `json:"change_ids"`
	}
	var out []diskInfo
	for key, ds := range st.disks {
		d := diskInfo{Key: key, Capacity: ds.capacity, Current: ds.current, Flat: flatName(ds.current),
			Snapshots: map[string]string{}, CBTEpoch: ds.epoch}
		d.Path, _ = localFlat(ds.current)
		for n := ds.current; n != ""; n = ds.nodes[n] {
			d.Chain = append(d.Chain, n)
		}
		for ref, ss := range st.snaps {
			if n, ok := ss.disks[key]; ok {
				d.Snapshots[ref.Value] = n
			}
		}
		for id := range ds.records {
			d.ChangeIds = append(d.ChangeIds, id)
		}
		sort.Strings(d.ChangeIds)
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	jsonReply(w, http.StatusOK, map[string]interface{}{"vm": vm.Name, "moref": vm.Self.Value, "disks": out})
}

// makeCert writes a self-signed certificate for 127.0.0.1, ::1 and localhost to dir/cert.pem
// (the CA file a client verifies with) and its key to dir/key.pem.
func makeCert(dir string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	ski := sha1.Sum(pub)
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "alike vcsim", Organization: []string{"alike tests"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(5, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          ski[:],
		AuthorityKeyId:        ski[:],
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
	if err := os.WriteFile(filepath.Join(dir, "cert.pem"), certPEM, 0o644); err != nil {
		return tls.Certificate{}, err
	}
	if err := os.WriteFile(filepath.Join(dir, "key.pem"), keyPEM, 0o600); err != nil {
		return tls.Certificate{}, err
	}
	return tls.X509KeyPair(certPEM, keyPEM)
}
