package main

// Resolving indeterminate writes before the check. An operation whose outcome the client never
// learned would otherwise stay open until the end of time, and a long run collects hundreds of
// them: the checker then has to consider each one taking effect anywhere after its call, and
// its search grows out of memory. Every write leaves a unique value in the store's history
// (deletes too: they write a marker key in the same transaction), so after the run the history
// read back tells, for each indeterminate write, whether it happened and at which revision:
//
//   - it never appears: it did not happen. Dropping it is sound, since it changed nothing and
//     returned nothing.
//   - it appears at revision R: it happened, and it had happened by the time any client got a
//     response whose header revision is R or later. Its return time becomes the earliest such
//     response, and its outcome becomes known (a compare-and-swap that wrote did succeed).
//
// A revoke whose outcome is unknown stays open-ended when the lease is gone, and is dropped
// when the lease still exists. Only puts of values that some event carries are considered.

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/anishathalye/porcupine"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// PatchStats counts what resolving did.
type PatchStats struct {
	Happened    int `json:"indeterminate_that_happened"`
	NotHappened int `json:"indeterminate_that_did_not"`
	OpenEnded   int `json:"indeterminate_left_open"`
	// Writes some client saw the effect of before the write was even issued.
	Problems []string `json:"problems,omitempty"`
}

// patchHistory resolves indeterminate writes against the reference history. leaseAlive answers
// whether a lease still exists (for revokes).
func patchHistory(ops []porcupine.Operation, ref []event, leaseAlive func(int64) (bool, error)) ([]porcupine.Operation, PatchStats) {
	written := map[string]int64{}
	for _, e := range ref {
		if !e.Deleted {
			if _, seen := written[e.Value]; !seen {
				written[e.Value] = e.Rev
			}
		}
	}
	observed := newObservations(ops)
	var stats PatchStats
	out := make([]porcupine.Operation, 0, len(ops))
	for _, op := range ops {
		o := op.Output.(Output)
		if !o.Unknown {
			out = append(out, op)
			continue
		}
		in := op.Input.(Input)
		var witness string
		switch in.Op {
		case "put", "lput", "cas", "mput":
			witness = in.Values[0]
		case "delete":
			witness = in.Marker
		case "revoke":
			alive, err := leaseAlive(in.Lease)
			switch {
			case err != nil:
				stats.OpenEnded++
				out = append(out, op)
			case alive:
				stats.NotHappened++
			default:
				stats.OpenEnded++
				out = append(out, op)
			}
			continue
		}
		rev, happened := written[witness]
		if !happened {
			stats.NotHappened++
			continue
		}
		stats.Happened++
		if ret, ok := observed.firstReturnAtOrAfter(rev); ok {
			if ret <= op.Call {
				stats.Problems = append(stats.Problems, fmt.Sprintf(
					"a response at revision %d or later returned before the %s that wrote revision %d was issued", rev, in.Op, rev))
			} else {
				op.Return = ret
			}
		}
		switch in.Op {
		case "cas":
			op.Output = Output{Succeeded: true, Rev: rev}
		case "put", "lput", "mput":
			op.Output = Output{Rev: rev}
		}
		out = append(out, op)
	}
	return out, stats
}

// observations answers: when did a client first get a response at revision R or later?
type observations struct {
	revs []int64 // ascending
	ret  []int64 // ret[i]: the earliest return time among responses with revision >= revs[i]
}

func newObservations(ops []porcupine.Operation) observations {
	type seen struct{ rev, ret int64 }
	var s []seen
	for _, op := range ops {
		o := op.Output.(Output)
		if !o.Unknown && o.Rev > 0 {
			s = append(s, seen{o.Rev, op.Return})
		}
	}
	sort.Slice(s, func(i, j int) bool { return s[i].rev < s[j].rev })
	obs := observations{revs: make([]int64, len(s)), ret: make([]int64, len(s))}
	earliest := int64(1 << 62)
	for i := len(s) - 1; i >= 0; i-- {
		if s[i].ret < earliest {
			earliest = s[i].ret
		}
		obs.revs[i], obs.ret[i] = s[i].rev, earliest
	}
	return obs
}

func (o observations) firstReturnAtOrAfter(rev int64) (int64, bool) {
	i := sort.Search(len(o.revs), func(i int) bool { return o.revs[i] >= rev })
	if i == len(o.revs) {
		return 0, false
	}
	return o.ret[i], true
}

// leaseChecker asks a healthy cluster whether a lease still exists.
func leaseChecker(c *Cluster) func(int64) (bool, error) {
	return func(id int64) (bool, error) {
		cli, err := c.Client()
		if err != nil {
			return false, err
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := cli.TimeToLive(ctx, clientv3.LeaseID(id))
		if err != nil {
			if isLeaseNotFound(err) {
				return false, nil
			}
			return false, err
		}
		return r.TTL > 0, nil
	}
}
