package main

// The system under test: three members (raftkv or etcd) started as processes, each in a network
// namespace of its own joined by a bridge, so that the nemesis can cut links between members
// with blackhole routes while clients (in the root namespace) still reach every member. Without
// root the members run on loopback and partitions are skipped.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

const (
	bridge    = "rkrb0"
	subnet    = "10.77.0"
	clientP   = 2379
	peerP     = 2380
	metricsP  = 9379
	slotCount = 3
)

// Cluster is the set of members and how to reach, stop and cut them.
type Cluster struct {
	target string // "raftkv" or "etcd"
	bin    string
	dir    string
	netns  bool
	// Every process started, including members since replaced: Stop ends them all.
	spawned   []*exec.Cmd
	electMs   int
	user      string
	password  string
	mu        sync.Mutex
	members   [slotCount + 1]*Member // slots 1..3
	pki       string
	nextToken int
	memberLog string // RUST_LOG for raftkv members
}

// Member is one member process in its slot.
type Member struct {
	Slot    int
	ID      uint64
	Cmd     *exec.Cmd
	Paused  bool
	Log     string
	DataDir string
	// Closed once the process has exited and been reaped.
	exited chan struct{}
}

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

func nsName(slot int) string { return fmt.Sprintf("rkr%d", slot) }

func (c *Cluster) host(slot int) string {
	if c.netns {
		return fmt.Sprintf("%s.%d", subnet, 10+slot)
	}
	return "127.0.0.1"
}

func (c *Cluster) port(slot, base int) int {
	if c.netns {
		return base
	}
	return 30000 + base%100*10 + slot*1000 // distinct loopback ports per slot
}

func (c *Cluster) ClientAddr(slot int) string {
	return fmt.Sprintf("%s:%d", c.host(slot), c.port(slot, clientP))
}

func (c *Cluster) PeerURL(slot int) string {
	scheme := "http"
	if c.target == "raftkv" {
		scheme = "https"
	}
	return fmt.Sprintf("%s://%s:%d", scheme, c.host(slot), c.port(slot, peerP))
}

func (c *Cluster) Endpoints() []string {
	var eps []string
	for s := 1; s <= slotCount; s++ {
		eps = append(eps, c.ClientAddr(s))
	}
	return eps
}

// setupNetwork makes the bridge and one namespace per slot; false if this machine cannot.
func setupNetwork() bool {
	teardownNetwork()
	if os.Geteuid() != 0 {
		return false
	}
	steps := [][]string{
		{"ip", "link", "add", bridge, "type", "bridge"},
		{"ip", "addr", "add", subnet + ".1/24", "dev", bridge},
		{"ip", "link", "set", bridge, "up"},
	}
	for s := 1; s <= slotCount; s++ {
		ns, veth, peer := nsName(s), fmt.Sprintf("rkrv%d", s), fmt.Sprintf("rkrp%d", s)
		steps = append(steps,
			[]string{"ip", "netns", "add", ns},
			[]string{"ip", "link", "add", veth, "type", "veth", "peer", "name", peer},
			[]string{"ip", "link", "set", peer, "netns", ns},
			[]string{"ip", "link", "set", veth, "master", bridge},
			[]string{"ip", "link", "set", veth, "up"},
			[]string{"ip", "netns", "exec", ns, "ip", "addr", "add", fmt.Sprintf("%s.%d/24", subnet, 10+s), "dev", peer},
			[]string{"ip", "netns", "exec", ns, "ip", "link", "set", peer, "up"},
			[]string{"ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"},
		)
	}
	for _, st := range steps {
		if err := sh(st...); err != nil {
			fmt.Fprintf(os.Stderr, "network namespaces unavailable (%v): running on loopback without partitions\n", err)
			teardownNetwork()
			return false
		}
	}
	return true
}

func teardownNetwork() {
	for s := 1; s <= slotCount; s++ {
		_ = exec.Command("ip", "netns", "del", nsName(s)).Run()
		_ = exec.Command("ip", "link", "del", fmt.Sprintf("rkrv%d", s)).Run()
	}
	_ = exec.Command("ip", "link", "del", bridge).Run()
}

// Cut blackholes traffic from slot `from` to slot `to` (one direction).
func (c *Cluster) Cut(from, to int) error {
	return sh("ip", "netns", "exec", nsName(from), "ip", "route", "replace", "blackhole", c.host(to)+"/32")
}

// Heal removes every cut.
func (c *Cluster) Heal() {
	if !c.netns {
		return
	}
	for a := 1; a <= slotCount; a++ {
		for b := 1; b <= slotCount; b++ {
			if a != b {
				_ = exec.Command("ip", "netns", "exec", nsName(a), "ip", "route", "del", "blackhole", c.host(b)+"/32").Run()
			}
		}
	}
}

func (c *Cluster) makePKI() error {
	if c.target != "raftkv" {
		return nil
	}
	c.pki = filepath.Join(c.dir, "pki")
	if err := sh(c.bin, "certs", "ca", "--dir", c.pki); err != nil {
		return err
	}
	for s := 1; s <= slotCount; s++ {
		if err := sh(c.bin, "certs", "member", "--dir", c.pki, "--name", fmt.Sprintf("slot-%d", s),
			"--host", c.host(s), "--host", "localhost"); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(c.pki, "jwt-secret"), []byte("robustness-secret-0123456789abcdef0123"), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.pki, "root-password"), []byte(c.password), 0o600); err != nil {
		return err
	}
	return sh(c.bin, "keyring", "new", filepath.Join(c.pki, "keyring.json"))
}

// args builds a member's command line; `existing` joins a running cluster.
func (c *Cluster) args(slot int, id uint64, initial string, existing bool) []string {
	dataDir := filepath.Join(c.dir, fmt.Sprintf("data-%d-%d", slot, id))
	if c.target == "raftkv" {
		a := []string{c.bin, "serve", "--id", strconv.FormatUint(id, 10), "--name", fmt.Sprintf("slot-%d", slot),
			"--data-dir", dataDir,
			"--listen-client", c.ClientAddr(slot),
			"--listen-peer", fmt.Sprintf("%s:%d", c.host(slot), c.port(slot, peerP)),
			"--listen-metrics", fmt.Sprintf("%s:%d", c.host(slot), c.port(slot, metricsP)),
			"--advertise-peer", c.PeerURL(slot),
			"--initial-cluster", initial, "--cluster-token", "robustness",
			"--election-timeout-ms", strconv.Itoa(c.electMs), "--heartbeat-interval-ms", "100",
			"--peer-cert-file", filepath.Join(c.pki, fmt.Sprintf("slot-%d.crt", slot)),
			"--peer-key-file", filepath.Join(c.pki, fmt.Sprintf("slot-%d.key", slot)),
			"--peer-trusted-ca-file", filepath.Join(c.pki, "ca.crt"),
			"--jwt-secret-file", filepath.Join(c.pki, "jwt-secret"),
			"--encryption-keyring-file", filepath.Join(c.pki, "keyring.json"),
			"--initial-root-password-file", filepath.Join(c.pki, "root-password"),
			"--snapshot-threshold", "5000", "--snapshot-log-keep", "1000",
		}
		if existing {
			a = append(a, "--initial-cluster-state", "existing")
		}
		return a
	}
	state := "new"
	if existing {
		state = "existing"
	}
	return []string{c.bin, "--name", fmt.Sprintf("slot-%d", slot), "--data-dir", dataDir,
		"--listen-client-urls", "http://" + c.ClientAddr(slot), "--advertise-client-urls", "http://" + c.ClientAddr(slot),
		"--listen-peer-urls", c.PeerURL(slot), "--initial-advertise-peer-urls", c.PeerURL(slot),
		"--initial-cluster", initial, "--initial-cluster-state", state, "--initial-cluster-token", "robustness",
		"--election-timeout", strconv.Itoa(c.electMs), "--heartbeat-interval", "100",
		"--snapshot-count", "5000", "--pre-vote",
	}
}

func (c *Cluster) spawn(slot int, id uint64, argv []string) error {
	if c.netns {
		argv = append([]string{"ip", "netns", "exec", nsName(slot)}, argv...)
	}
	logPath := filepath.Join(c.dir, fmt.Sprintf("member-%d-%d.log", slot, id))
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	// Members die with the suite, however it ends.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), "RUST_LOG="+c.memberLog)
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(exited) }()
	c.mu.Lock()
	c.spawned = append(c.spawned, cmd)
	old := c.members[slot]
	m := &Member{Slot: slot, ID: id, Cmd: cmd, Log: logPath, exited: exited}
	if old != nil {
		m.DataDir = old.DataDir
	}
	c.members[slot] = m
	c.mu.Unlock()
	return nil
}

// Start forms a new three-member cluster.
func (c *Cluster) Start() error {
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return err
	}
	if err := c.makePKI(); err != nil {
		return err
	}
	var initial []string
	for s := 1; s <= slotCount; s++ {
		if c.target == "raftkv" {
			initial = append(initial, fmt.Sprintf("%d=%s", s, c.PeerURL(s)))
		} else {
			initial = append(initial, fmt.Sprintf("slot-%d=%s", s, c.PeerURL(s)))
		}
	}
	for s := 1; s <= slotCount; s++ {
		if err := c.spawn(s, uint64(s), c.args(s, uint64(s), strings.Join(initial, ","), false)); err != nil {
			return err
		}
	}
	return c.WaitHealthy(60 * time.Second)
}

// Client connects to the given endpoints (all when empty).
func (c *Cluster) Client(eps ...string) (*clientv3.Client, error) {
	if len(eps) == 0 {
		eps = c.Endpoints()
	}
	return clientv3.New(clientv3.Config{
		Endpoints:            eps,
		DialTimeout:          2 * time.Second,
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		Username:             c.user,
		Password:             c.password,
		Logger:               zap.NewNop(),
	})
}

// WaitHealthy waits until a linearizable write and read succeed.
func (c *Cluster) WaitHealthy(d time.Duration) error {
	deadline := time.Now().Add(d)
	var last error
	for time.Now().Before(deadline) {
		cli, err := c.Client()
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			_, err = cli.Put(ctx, "health", "ok")
			if err == nil {
				_, err = cli.Get(ctx, "health")
			}
			cancel()
			cli.Close()
			if err == nil {
				return nil
			}
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("cluster not healthy within %v: %v", d, last)
}

// Status of the member in slot (through its own endpoint only).
func (c *Cluster) Status(slot int) (*clientv3.StatusResponse, error) {
	cli, err := c.Client(c.ClientAddr(slot))
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return cli.Status(ctx, c.ClientAddr(slot))
}

// Leader returns the slot of the member every reachable member names as leader (0: none).
func (c *Cluster) Leader() int {
	ids := map[uint64]int{}
	for s := 1; s <= slotCount; s++ {
		st, err := c.Status(s)
		if err != nil || st.Leader == 0 {
			continue
		}
		ids[st.Leader]++
	}
	for id := range ids {
		for s := 1; s <= slotCount; s++ {
			if m := c.members[s]; m != nil && c.memberID(s) == id {
				return s
			}
		}
	}
	return 0
}

func (c *Cluster) memberID(slot int) uint64 {
	st, err := c.Status(slot)
	if err != nil {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.members[slot].ID
	}
	return st.Header.MemberId
}

func (c *Cluster) signal(slot int, sig syscall.Signal) error {
	c.mu.Lock()
	m := c.members[slot]
	c.mu.Unlock()
	if m == nil || m.Cmd.Process == nil {
		return fmt.Errorf("slot %d has no process", slot)
	}
	return m.Cmd.Process.Signal(sig)
}

// Kill sends SIGKILL and waits for the process to go.
func (c *Cluster) Kill(slot int) error {
	// A member that was removed may have stopped on its own: then there is nothing to kill.
	if err := c.signal(slot, syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	// Until it is reaped the process still holds its database lock: a replacement started
	// on the same data directory (a re-added member gets the same id, so the same directory)
	// would fail to open it.
	c.mu.Lock()
	m := c.members[slot]
	c.mu.Unlock()
	select {
	case <-m.exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("slot %d: still running 10s after SIGKILL", slot)
	}
}

// Restart starts the member of slot again with the same flags and data.
func (c *Cluster) Restart(slot int) error {
	c.mu.Lock()
	m := c.members[slot]
	c.mu.Unlock()
	argv := m.Cmd.Args
	if c.netns && len(argv) > 4 && argv[0] == "ip" {
		argv = argv[4:]
	}
	return c.spawn(slot, m.ID, argv)
}

func (c *Cluster) Pause(slot int) error  { return c.signal(slot, syscall.SIGSTOP) }
func (c *Cluster) Resume(slot int) error { return c.signal(slot, syscall.SIGCONT) }

// Replace removes the member of slot from the cluster, wipes it, adds it back as a learner with
// fresh storage, and promotes it once it caught up: a membership change while clients run.
func (c *Cluster) Replace(slot int) error {
	cli, err := c.Client()
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	id := c.memberID(slot)
	// etcd refuses a removal while a member has not been connected for long ("unhealthy
	// cluster"), and a removed leader may stop before it answers: retry until the member is gone.
	for {
		_, err := cli.MemberRemove(ctx, id)
		if err == nil || !c.isMember(ctx, cli, id) {
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("remove %x: %w", id, err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if err := c.Kill(slot); err != nil {
		return err
	}
	// Adding may time out while the cluster elects a leader (the removed member may have led);
	// a retry after an add that did land finds the learner by its URL.
	var members []*etcdserverpb.Member
	var newID uint64
	var lastErr error
	for newID == 0 {
		add, err := cli.MemberAddAsLearner(ctx, []string{c.PeerURL(slot)})
		if err == nil {
			newID, members = add.Member.ID, add.Members
			break
		}
		lastErr = err
		if list, lerr := cli.MemberList(ctx); lerr == nil {
			for _, m := range list.Members {
				if len(m.PeerURLs) > 0 && m.PeerURLs[0] == c.PeerURL(slot) {
					newID, members = m.ID, list.Members
				}
			}
		}
		if newID == 0 && ctx.Err() != nil {
			return fmt.Errorf("add learner: %v (last refusal: %v)", err, lastErr)
		}
		time.Sleep(300 * time.Millisecond)
	}
	var initial []string
	for _, m := range members {
		name := m.Name
		url := ""
		if len(m.PeerURLs) > 0 {
			url = m.PeerURLs[0]
		}
		if m.ID == newID {
			name = fmt.Sprintf("slot-%d", slot)
		}
		if c.target == "raftkv" {
			initial = append(initial, fmt.Sprintf("%d=%s", m.ID, url))
		} else {
			initial = append(initial, fmt.Sprintf("%s=%s", name, url))
		}
	}
	if err := c.spawn(slot, newID, c.args(slot, newID, strings.Join(initial, ","), true)); err != nil {
		return err
	}
	for {
		_, err := cli.MemberPromote(ctx, newID)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("promote %x: %w", newID, err)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// Stop ends every process the suite started.
func (c *Cluster) Stop() {
	c.mu.Lock()
	all := append([]*exec.Cmd(nil), c.spawned...)
	c.mu.Unlock()
	for _, cmd := range all {
		if cmd.Process != nil {
			_ = cmd.Process.Signal(syscall.SIGCONT)
			_ = cmd.Process.Kill()
		}
	}
	c.Heal()
}

// isMember: whether the cluster still lists id (true when it cannot be asked).
func (c *Cluster) isMember(ctx context.Context, cli *clientv3.Client, id uint64) bool {
	list, err := cli.MemberList(ctx)
	if err != nil {
		return true
	}
	for _, m := range list.Members {
		if m.ID == id {
			return true
		}
	}
	return false
}
