package main

// Clients and the history they record. Every operation gets its invoke and return time; a
// write whose outcome is unknown (timeout, lost connection, Unavailable) stays in the history as
// indeterminate, never dropped. Keys come in small groups so that operations collide; a
// multi-key transaction stays within its group, which lets the checker split the history.

import (
	"context"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/anishathalye/porcupine"
	clientv3 "go.etcd.io/etcd/client/v3"
)

const (
	groups       = 4
	keysPerGroup = 3
	prefix       = "rb/"
)

func key(g, k int) string { return fmt.Sprintf("%sg%d/k%d", prefix, g, k) }

// markerKey is written by every delete of group g, so that the store's history tells whether
// a delete whose outcome the client never learned took effect (see patch.go). Nobody reads it.
func markerKey(g int) string { return fmt.Sprintf("%sg%d/deleted", prefix, g) }

// Input is what an operation asked.
type Input struct {
	Op     string // put, get, cas, delete, mput, mget, lput, revoke
	Group  int
	Keys   []string
	Values []string
	Expect string // cas: the value compared against
	Lease  int64  // lput, revoke
	Marker string // delete: the unique value its transaction writes to the group's marker key
	Seg    int    // the segment the checker puts it in (segment.go)
	State  state  // init, assert: the state a segment starts from or must be able to end in
}

// Output is what it got back.
type Output struct {
	Unknown   bool
	Values    []string
	Exists    []bool
	Succeeded bool
	Deleted   int64
	Rev       int64
}

// History collects operations from every client.
type History struct {
	mu     sync.Mutex
	start  time.Time
	ops    []porcupine.Operation
	writes []time.Time // return times of successful writes, for availability
	values map[string]bool
	// Per client, the revisions of response headers, in order.
	revs         map[int][]int64
	acked        []ackedWrite
	unknown      atomic.Int64
	failedReads  atomic.Int64
	errorsByText map[string]int
}

type ackedWrite struct {
	Key     string
	Value   string // "" for a delete
	Deleted bool
	Rev     int64
}

func newHistory() *History {
	return &History{start: time.Now(), values: map[string]bool{}, revs: map[int][]int64{}, errorsByText: map[string]int{}}
}

func (h *History) now() int64 { return time.Since(h.start).Nanoseconds() }

func (h *History) noteError(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	text := err.Error()
	if len(text) > 80 {
		text = text[:80]
	}
	h.errorsByText[text]++
}

func (h *History) record(client int, in Input, call int64, out Output, err error, write bool) {
	ret := h.now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if err != nil {
		if !write {
			h.failedReads.Add(1)
			return
		}
		// The write may or may not have happened: it may take effect any time after its call.
		out = Output{Unknown: true}
		ret = 1 << 62
		h.unknown.Add(1)
	} else {
		if write {
			h.writes = append(h.writes, h.start.Add(time.Duration(ret)))
		}
		if out.Rev > 0 {
			h.revs[client] = append(h.revs[client], out.Rev)
		}
	}
	h.ops = append(h.ops, porcupine.Operation{ClientId: client, Input: in, Call: call, Output: out, Return: ret})
}

// Worker runs one client's loop until ctx ends.
type Worker struct {
	id      int
	cli     *clientv3.Client
	h       *History
	rnd     *rand.Rand
	counter int
	leases  []leaseKey
}

type leaseKey struct {
	lease int64
	group int
}

func (w *Worker) value() string {
	w.counter++
	v := fmt.Sprintf("c%d-%d", w.id, w.counter)
	w.h.mu.Lock()
	w.h.values[v] = true
	w.h.mu.Unlock()
	return v
}

func (w *Worker) Run(ctx context.Context) {
	for ctx.Err() == nil {
		w.step(ctx)
	}
}

func (w *Worker) step(parent context.Context) {
	ctx, cancel := context.WithTimeout(parent, 2*time.Second)
	defer cancel()
	g := w.rnd.Intn(groups)
	k := key(g, w.rnd.Intn(keysPerGroup))
	call := w.h.now()
	switch r := w.rnd.Intn(100); {
	case r < 25:
		v := w.value()
		resp, err := w.cli.Put(ctx, k, v)
		out := Output{}
		if err == nil {
			out.Rev = resp.Header.Revision
			w.ack(k, v, false, out.Rev)
		} else {
			w.h.noteError(err)
		}
		w.h.record(w.id, Input{Op: "put", Group: g, Keys: []string{k}, Values: []string{v}}, call, out, err, true)
	case r < 55:
		resp, err := w.cli.Get(ctx, k)
		out := Output{}
		if err == nil {
			out.Rev = resp.Header.Revision
			if len(resp.Kvs) > 0 {
				out.Values, out.Exists = []string{string(resp.Kvs[0].Value)}, []bool{true}
			} else {
				out.Values, out.Exists = []string{""}, []bool{false}
			}
		}
		w.h.record(w.id, Input{Op: "get", Group: g, Keys: []string{k}}, call, out, err, false)
	case r < 70:
		// Compare-and-swap against a value read just before (or one that never existed).
		expect := ""
		if cur, err := w.cli.Get(ctx, k); err == nil && len(cur.Kvs) > 0 && w.rnd.Intn(5) > 0 {
			expect = string(cur.Kvs[0].Value)
		}
		call = w.h.now()
		v := w.value()
		resp, err := w.cli.Txn(ctx).If(clientv3.Compare(clientv3.Value(k), "=", expect)).
			Then(clientv3.OpPut(k, v)).Else(clientv3.OpGet(k)).Commit()
		out := Output{}
		if err == nil {
			out.Rev = resp.Header.Revision
			out.Succeeded = resp.Succeeded
			if resp.Succeeded {
				w.ack(k, v, false, out.Rev)
			} else {
				kvs := resp.Responses[0].GetResponseRange().Kvs
				if len(kvs) > 0 {
					out.Values, out.Exists = []string{string(kvs[0].Value)}, []bool{true}
				} else {
					out.Values, out.Exists = []string{""}, []bool{false}
				}
			}
		}
		w.h.record(w.id, Input{Op: "cas", Group: g, Keys: []string{k}, Values: []string{v}, Expect: expect}, call, out, err, true)
	case r < 78:
		marker := w.value()
		resp, err := w.cli.Txn(ctx).Then(clientv3.OpDelete(k), clientv3.OpPut(markerKey(g), marker)).Commit()
		out := Output{}
		if err == nil {
			out.Rev = resp.Header.Revision
			out.Deleted = resp.Responses[0].GetResponseDeleteRange().Deleted
			if out.Deleted > 0 {
				w.ack(k, "", true, out.Rev)
			}
			w.ack(markerKey(g), marker, false, out.Rev)
		}
		w.h.record(w.id, Input{Op: "delete", Group: g, Keys: []string{k}, Marker: marker}, call, out, err, true)
	case r < 86:
		// Two keys of a group, written atomically.
		k2 := key(g, (keyIndex(k)+1)%keysPerGroup)
		v1, v2 := w.value(), w.value()
		resp, err := w.cli.Txn(ctx).Then(clientv3.OpPut(k, v1), clientv3.OpPut(k2, v2)).Commit()
		out := Output{}
		if err == nil {
			out.Rev = resp.Header.Revision
			w.ack(k, v1, false, out.Rev)
			w.ack(k2, v2, false, out.Rev)
		}
		w.h.record(w.id, Input{Op: "mput", Group: g, Keys: []string{k, k2}, Values: []string{v1, v2}}, call, out, err, true)
	case r < 93:
		k2 := key(g, (keyIndex(k)+1)%keysPerGroup)
		resp, err := w.cli.Txn(ctx).Then(clientv3.OpGet(k), clientv3.OpGet(k2)).Commit()
		out := Output{}
		if err == nil {
			out.Rev = resp.Header.Revision
			for _, r := range resp.Responses {
				kvs := r.GetResponseRange().Kvs
				if len(kvs) > 0 {
					out.Values, out.Exists = append(out.Values, string(kvs[0].Value)), append(out.Exists, true)
				} else {
					out.Values, out.Exists = append(out.Values, ""), append(out.Exists, false)
				}
			}
		}
		w.h.record(w.id, Input{Op: "mget", Group: g, Keys: []string{k, k2}}, call, out, err, false)
	case r < 97 || len(w.leases) == 0:
		// A key attached to a fresh lease (long enough never to expire during the run: expiry is
		// checked separately, since it happens at no client's request).
		lease, err := w.cli.Grant(ctx, 3600)
		if err != nil {
			w.h.noteError(err)
			return
		}
		call = w.h.now()
		v := w.value()
		resp, err := w.cli.Put(ctx, k, v, clientv3.WithLease(lease.ID))
		out := Output{}
		if err == nil {
			out.Rev = resp.Header.Revision
			w.ack(k, v, false, out.Rev)
		}
		w.h.record(w.id, Input{Op: "lput", Group: g, Keys: []string{k}, Values: []string{v}, Lease: int64(lease.ID)}, call, out, err, true)
		w.leases = append(w.leases, leaseKey{lease: int64(lease.ID), group: g})
	default:
		i := w.rnd.Intn(len(w.leases))
		l := w.leases[i]
		w.leases = append(w.leases[:i], w.leases[i+1:]...)
		resp, err := w.cli.Revoke(ctx, clientv3.LeaseID(l.lease))
		out := Output{}
		if err == nil {
			out.Rev = resp.Header.Revision
		} else if isLeaseNotFound(err) {
			// The lease is gone; nothing changed.
			return
		}
		w.h.record(w.id, Input{Op: "revoke", Group: l.group, Lease: l.lease}, call, out, err, true)
	}
}

func (w *Worker) ack(k, v string, deleted bool, rev int64) {
	w.h.mu.Lock()
	w.h.acked = append(w.h.acked, ackedWrite{Key: k, Value: v, Deleted: deleted, Rev: rev})
	w.h.mu.Unlock()
}

func keyIndex(k string) int {
	var g, i int
	fmt.Sscanf(k, prefix+"g%d/k%d", &g, &i)
	return i
}

func isLeaseNotFound(err error) bool {
	return err != nil && strings.Contains(err.Error(), "requested lease not found")
}
