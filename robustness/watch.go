package main

// Watchers kept through the faults: one started at revision 1, one at "now". On any error they
// resume from the revision after the last event they saw, through whichever member answers.
// Afterwards their events are compared with the history read back from a healthy cluster:
// ordered, unique, no gaps, exactly the puts and deletes that happened.

import (
	"context"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

type event struct {
	Rev     int64
	Key     string
	Value   string
	Deleted bool
	Lease   int64
}

type Watcher struct {
	name    string
	start   int64
	c       *Cluster
	mu      sync.Mutex
	events  []event
	resumes int
	// When events were delivered, for the longest time without any (overall and per round).
	delivered []time.Time
	// The member that sent the last response (its header says so).
	member   uint64
	problems []string
}

func (w *Watcher) Run(ctx context.Context) {
	next := w.start
	for ctx.Err() == nil {
		cli, err := w.c.Client()
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		ch := cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(next), clientv3.WithPrevKV())
		for resp := range ch {
			if err := resp.Err(); err != nil {
				if resp.CompactRevision != 0 {
					w.mu.Lock()
					w.problems = append(w.problems, fmt.Sprintf("%s: compacted at %d while resuming from %d", w.name, resp.CompactRevision, next))
					w.mu.Unlock()
				}
				break
			}
			now := time.Now()
			w.mu.Lock()
			w.member = resp.Header.MemberId
			for _, ev := range resp.Events {
				e := event{Rev: ev.Kv.ModRevision, Key: string(ev.Kv.Key), Value: string(ev.Kv.Value), Deleted: ev.Type == clientv3.EventTypeDelete, Lease: ev.Kv.Lease}
				w.events = append(w.events, e)
				next = e.Rev + 1
			}
			if len(resp.Events) > 0 {
				w.delivered = append(w.delivered, now)
			}
			w.mu.Unlock()
		}
		cancel()
		cli.Close()
		if ctx.Err() == nil {
			w.mu.Lock()
			w.resumes++
			w.mu.Unlock()
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// reference reads every event under the prefix from `from` to `to` from a healthy cluster.
func reference(c *Cluster, from, to int64) ([]event, error) {
	cli, err := c.Client()
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out []event
	wctx := clientv3.WithRequireLeader(ctx)
	ch := cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(from), clientv3.WithProgressNotify())
	// A progress notification at `to` or later says every event up to `to` was delivered.
	go func() {
		for ctx.Err() == nil {
			_ = cli.RequestProgress(wctx)
			time.Sleep(200 * time.Millisecond)
		}
	}()
	for resp := range ch {
		if err := resp.Err(); err != nil {
			return nil, err
		}
		for _, ev := range resp.Events {
			out = append(out, event{Rev: ev.Kv.ModRevision, Key: string(ev.Kv.Key), Value: string(ev.Kv.Value), Deleted: ev.Type == clientv3.EventTypeDelete, Lease: ev.Kv.Lease})
		}
		if resp.IsProgressNotify() && resp.Header.Revision >= to {
			return out, nil
		}
	}
	return out, fmt.Errorf("reference watch ended early at %d events: %v", len(out), ctx.Err())
}

// compare checks a watcher's events against the reference: same events, same order, no gaps
// and no duplicates, from the watcher's start up to the end of the reference.
func (w *Watcher) compare(ref []event, end int64) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	problems := append([]string(nil), w.problems...)
	var want []event
	for _, e := range ref {
		if e.Rev >= w.start && e.Rev <= end {
			want = append(want, e)
		}
	}
	var got []event
	for _, e := range w.events {
		if e.Rev <= end {
			got = append(got, e)
		}
	}
	for i := 1; i < len(got); i++ {
		if got[i].Rev < got[i-1].Rev {
			problems = append(problems, fmt.Sprintf("%s: event at %d after %d", w.name, got[i].Rev, got[i-1].Rev))
			break
		}
		if got[i] == got[i-1] {
			problems = append(problems, fmt.Sprintf("%s: event %v delivered twice", w.name, got[i]))
			break
		}
	}
	n := len(got)
	if len(want) < n {
		n = len(want)
	}
	for i := 0; i < n; i++ {
		if got[i] != want[i] {
			problems = append(problems, fmt.Sprintf("%s: event %d is %v, the history has %v", w.name, i, got[i], want[i]))
			break
		}
	}
	if len(got) != len(want) {
		problems = append(problems, fmt.Sprintf("%s: %d events up to revision %d, the history has %d", w.name, len(got), end, len(want)))
	}
	return problems
}

// checkAcked: every acknowledged write is in the history at its revision.
func checkAcked(h *History, ref []event) []string {
	at := map[string]event{}
	for _, e := range ref {
		at[fmt.Sprintf("%d/%s", e.Rev, e.Key)] = e
	}
	var problems []string
	for _, a := range h.acked {
		e, ok := at[fmt.Sprintf("%d/%s", a.Rev, a.Key)]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("acknowledged write of %s at revision %d is missing from the history", a.Key, a.Rev))
		case a.Deleted != e.Deleted || (!a.Deleted && e.Value != a.Value):
			problems = append(problems, fmt.Sprintf("acknowledged write of %s=%q at %d, the history has %v", a.Key, a.Value, a.Rev, e))
		}
		if len(problems) > 20 {
			break
		}
	}
	return problems
}

// gap is the longest time within [from, to] in which the watcher got no event.
func (w *Watcher) gap(from, to time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	return longestWithout(w.delivered, from, to)
}

// servedBy: whether member id sent the watcher's last response.
func (w *Watcher) servedBy(id uint64) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return id != 0 && w.member == id
}
