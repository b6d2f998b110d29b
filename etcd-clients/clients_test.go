// The etcd features programs rely on, through etcd's own Go clients, against whatever cluster
// ETCD_CLIENTS_ENDPOINTS names (raftkv or etcd): client-side locks, elections and STM from
// clientv3/concurrency, the Lock and Election gRPC services through their generated clients,
// progress notifications ordered after the events they cover, and leader-required watches on a
// member cut off from the others.
//
// Environment: ETCD_CLIENTS_ENDPOINTS (comma-separated host:port), ETCD_CLIENTS_USER and
// ETCD_CLIENTS_PASSWORD (optional), ETCD_CLIENTS_PIDS (the members' process ids, in endpoint
// order, for the cut-off test).
package etcdclients

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"go.uber.org/zap"
)

func endpoints(t *testing.T) []string {
	eps := os.Getenv("ETCD_CLIENTS_ENDPOINTS")
	if eps == "" {
		t.Skip("ETCD_CLIENTS_ENDPOINTS is not set (node/tests/etcd_clients.rs sets it)")
	}
	return strings.Split(eps, ",")
}

func connect(t *testing.T, eps []string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   eps,
		DialTimeout: 5 * time.Second,
		Username:    os.Getenv("ETCD_CLIENTS_USER"),
		Password:    os.Getenv("ETCD_CLIENTS_PASSWORD"),
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ctx(t *testing.T, d time.Duration) context.Context {
	c, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return c
}

func TestMutexExcludesAndHandsOver(t *testing.T) {
	c := connect(t, endpoints(t))
	s1, err := concurrency.NewSession(c, concurrency.WithTTL(10))
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s2, err := concurrency.NewSession(c, concurrency.WithTTL(10))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	m1 := concurrency.NewMutex(s1, "/mutex/")
	m2 := concurrency.NewMutex(s2, "/mutex/")
	if err := m1.Lock(ctx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := m2.TryLock(ctx(t, 5*time.Second)); err != concurrency.ErrLocked {
		t.Fatalf("TryLock while held: %v", err)
	}
	acquired := make(chan error, 1)
	go func() { acquired <- m2.Lock(ctx(t, 20*time.Second)) }()
	select {
	case err := <-acquired:
		t.Fatalf("second lock while the first is held: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	if err := m1.Unlock(ctx(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := <-acquired; err != nil {
		t.Fatalf("second lock after unlock: %v", err)
	}
	_ = m2.Unlock(ctx(t, 5*time.Second))
}

func TestElectionLeadsProclaimsAndResigns(t *testing.T) {
	c := connect(t, endpoints(t))
	s1, _ := concurrency.NewSession(c, concurrency.WithTTL(10))
	s2, _ := concurrency.NewSession(c, concurrency.WithTTL(10))
	defer s1.Close()
	defer s2.Close()
	e1 := concurrency.NewElection(s1, "/election/")
	e2 := concurrency.NewElection(s2, "/election/")
	if err := e1.Campaign(ctx(t, 10*time.Second), "a"); err != nil {
		t.Fatal(err)
	}
	obs := e2.Observe(ctx(t, 30*time.Second))
	first := <-obs
	if string(first.Kvs[0].Value) != "a" {
		t.Fatalf("observed %q", first.Kvs[0].Value)
	}
	won := make(chan error, 1)
	go func() { won <- e2.Campaign(ctx(t, 20*time.Second), "b") }()
	if err := e1.Proclaim(ctx(t, 5*time.Second), "a2"); err != nil {
		t.Fatal(err)
	}
	if v := <-obs; string(v.Kvs[0].Value) != "a2" {
		t.Fatalf("observed %q after proclaim", v.Kvs[0].Value)
	}
	if err := e1.Resign(ctx(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := <-won; err != nil {
		t.Fatalf("second candidate: %v", err)
	}
	leader, err := e2.Leader(ctx(t, 5*time.Second))
	if err != nil || string(leader.Kvs[0].Value) != "b" {
		t.Fatalf("leader after resign: %v %v", leader, err)
	}
}

func TestSTMIncrementsAreSerializable(t *testing.T) {
	c := connect(t, endpoints(t))
	const workers, each = 4, 15
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				_, err := concurrency.NewSTM(c, func(s concurrency.STM) error {
					n, _ := strconv.Atoi(s.Get("/stm/counter"))
					s.Put("/stm/counter", strconv.Itoa(n+1))
					return nil
				}, concurrency.WithIsolation(concurrency.Serializable))
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	r, err := c.Get(ctx(t, 5*time.Second), "/stm/counter")
	if err != nil {
		t.Fatal(err)
	}
	if got := string(r.Kvs[0].Value); got != strconv.Itoa(workers*each) {
		t.Fatalf("counter = %s, want %d: an increment was lost", got, workers*each)
	}
}

func TestLockAndElectionServices(t *testing.T) {
	c := connect(t, endpoints(t))
	locks := v3lockpb.NewLockClient(c.ActiveConnection())
	elections := v3electionpb.NewElectionClient(c.ActiveConnection())
	l1, err := c.Grant(ctx(t, 5*time.Second), 30)
	if err != nil {
		t.Fatal(err)
	}
	l2, _ := c.Grant(ctx(t, 5*time.Second), 30)
	held, err := locks.Lock(ctx(t, 10*time.Second), &v3lockpb.LockRequest{Name: []byte("svc-lock"), Lease: int64(l1.ID)})
	if err != nil {
		t.Fatalf("Lock: %v", err)
	}
	got := make(chan error, 1)
	go func() {
		_, err := locks.Lock(ctx(t, 20*time.Second), &v3lockpb.LockRequest{Name: []byte("svc-lock"), Lease: int64(l2.ID)})
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("a held lock was granted again: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	if _, err := locks.Unlock(ctx(t, 5*time.Second), &v3lockpb.UnlockRequest{Key: held.Key}); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatalf("Lock after Unlock: %v", err)
	}

	camp, err := elections.Campaign(ctx(t, 10*time.Second), &v3electionpb.CampaignRequest{Name: []byte("svc-election"), Lease: int64(l1.ID), Value: []byte("one")})
	if err != nil {
		t.Fatalf("Campaign: %v", err)
	}
	lead, err := elections.Leader(ctx(t, 5*time.Second), &v3electionpb.LeaderRequest{Name: []byte("svc-election")})
	if err != nil || string(lead.Kv.Value) != "one" {
		t.Fatalf("Leader: %v %v", lead, err)
	}
	if _, err := elections.Proclaim(ctx(t, 5*time.Second), &v3electionpb.ProclaimRequest{Leader: camp.Leader, Value: []byte("two")}); err != nil {
		t.Fatalf("Proclaim: %v", err)
	}
	lead, _ = elections.Leader(ctx(t, 5*time.Second), &v3electionpb.LeaderRequest{Name: []byte("svc-election")})
	if string(lead.Kv.Value) != "two" {
		t.Fatalf("Leader after Proclaim: %q", lead.Kv.Value)
	}
	if _, err := elections.Resign(ctx(t, 5*time.Second), &v3electionpb.ResignRequest{Leader: camp.Leader}); err != nil {
		t.Fatalf("Resign: %v", err)
	}
	if _, err := elections.Leader(ctx(t, 5*time.Second), &v3electionpb.LeaderRequest{Name: []byte("svc-election")}); err == nil || !strings.Contains(err.Error(), "election: no leader") {
		t.Fatalf("Leader after Resign: %v", err)
	}
}

func TestProgressNotificationsNeverRunAheadOfEvents(t *testing.T) {
	eps := endpoints(t)
	c := connect(t, eps)
	// Watch through another member than the writer's, as an API server's watch cache does.
	watcher := connect(t, eps[len(eps)-1:])
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(context.Background()))
	defer cancel()
	start, err := c.Get(ctx(t, 5*time.Second), "/progress/")
	if err != nil {
		t.Fatal(err)
	}
	ch := watcher.Watch(wctx, "/progress/", clientv3.WithPrefix(), clientv3.WithRev(start.Header.Revision+1))
	const writes = 650
	done := make(chan error, 1)
	go func() {
		for i := 0; i < writes; i++ {
			if _, err := c.Put(context.Background(), fmt.Sprintf("/progress/%d", i), "v"); err != nil {
				done <- err
				return
			}
			if i%10 == 0 {
				_ = watcher.RequestProgress(wctx)
			}
		}
		done <- nil
	}()
	var lastEvent, lastProgress int64
	events, notifications := 0, 0
	timeout := time.After(60 * time.Second)
	for events < writes {
		select {
		case resp, ok := <-ch:
			if !ok {
				t.Fatalf("watch closed after %d events", events)
			}
			if err := resp.Err(); err != nil {
				t.Fatal(err)
			}
			if resp.IsProgressNotify() {
				if resp.Header.Revision < lastEvent {
					t.Fatalf("progress at %d behind event %d", resp.Header.Revision, lastEvent)
				}
				if resp.Header.Revision > lastProgress {
					lastProgress = resp.Header.Revision
				}
				notifications++
				continue
			}
			for _, ev := range resp.Events {
				if ev.Kv.ModRevision <= lastProgress {
					t.Fatalf("event at %d arrived after a progress notification at %d", ev.Kv.ModRevision, lastProgress)
				}
				if ev.Kv.ModRevision <= lastEvent {
					t.Fatalf("event at %d after %d", ev.Kv.ModRevision, lastEvent)
				}
				lastEvent = ev.Kv.ModRevision
				events++
			}
		case <-timeout:
			t.Fatalf("only %d of %d events in 60s", events, writes)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if notifications == 0 {
		t.Fatal("no progress notification arrived")
	}
	t.Logf("%d events, %d progress notifications", events, notifications)
}

// TestLeaderRequiredWatchEndsOnACutOffMember stops (SIGSTOP) every member but the last, and
// expects a leader-required watch on the last to end with "no leader".
func TestLeaderRequiredWatchEndsOnACutOffMember(t *testing.T) {
	eps := endpoints(t)
	pids := strings.Split(os.Getenv("ETCD_CLIENTS_PIDS"), ",")
	if len(pids) != len(eps) || len(eps) < 3 {
		t.Skip("ETCD_CLIENTS_PIDS does not name every member")
	}
	c := connect(t, eps[len(eps)-1:])
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(context.Background()))
	defer cancel()
	ch := c.Watch(wctx, "/isolated/", clientv3.WithPrefix())
	if _, err := c.Put(ctx(t, 5*time.Second), "/isolated/before", "v"); err != nil {
		t.Fatal(err)
	}
	<-ch
	var stopped []int
	for _, p := range pids[:len(pids)-1] {
		pid, _ := strconv.Atoi(p)
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatalf("SIGSTOP %d: %v", pid, err)
		}
		stopped = append(stopped, pid)
	}
	defer func() {
		for _, pid := range stopped {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	cut := time.Now()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case resp, ok := <-ch:
			if !ok || resp.Err() != nil {
				err := resp.Err()
				if ok && err != rpctypes.ErrNoLeader && !strings.Contains(fmt.Sprint(err), "no leader") {
					t.Fatalf("watch ended with %v, want no leader", err)
				}
				t.Logf("leader-required watch ended %v after the cut: %v", time.Since(cut), err)
				return
			}
		case <-deadline:
			t.Fatal("the leader-required watch stayed open on a member without a leader")
		}
	}
}
