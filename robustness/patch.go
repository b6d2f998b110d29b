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
// A revoke whose outcome is unknown is dropped when the lease still exists. When the lease is
// gone, the revision at which keys holding it were deleted without a delete's marker is where
// it happened; if no such revision exists it found no key and changed nothing. Only when the
// cluster cannot be asked does it stay open-ended. Only puts of values that some event carries
// are considered.

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// PatchStats counts what resolving did.
type PatchStats struct {
	Happened    int `json:"indeterminate_that_happened"`
	NotHappened int `json:"indeterminate_that_did_not"`
	OpenEnded   int `json:"indeterminate_left_open"`
	// Revokes of leases that are gone and never held a key when revoked.
	NoEffect int `json:"indeterminate_revokes_without_effect"`
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
	revoked, finalLeases := leaseHistory(ref)
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
				continue
			case alive:
				stats.NotHappened++
				continue
			}
			if rev, ok := revoked[in.Lease]; ok {
				witness = revokeWitness(rev)
				written[witness] = rev
				break
			}
			// Gone, yet no key attached to it was ever deleted: the revoke found no key
			// holding the lease. Taking effect at the end of the history, after everything,
			// it changes nothing, so the history without it is equivalent, unless a key still
			// holds the lease at the end.
			if k, held := finalLeases[in.Lease]; held {
				stats.Problems = append(stats.Problems, fmt.Sprintf("lease %x is gone but %s is still attached to it", in.Lease, k))
			}
			stats.NoEffect++
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
		// The revision goes with it: the checker's segments are joined at the highest revision
		// their operations observed (segment.go), and one that took effect at rev belongs there.
		switch in.Op {
		case "cas":
			op.Output = Output{Succeeded: true, Rev: rev}
		case "put", "lput", "mput", "revoke":
			op.Output = Output{Rev: rev}
		case "delete":
			// How many keys it deleted stays unknown; the model deletes the key either way.
			op.Output = Output{Unknown: true, Rev: rev}
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

// revokeWitness is a key into the written map that no value can collide with.
func revokeWitness(rev int64) string { return fmt.Sprintf("\x00revoke@%d", rev) }

// leaseHistory reads off the reference history the revision at which each lease was revoked
// (keys holding it deleted in a revision that wrote no delete marker) and, for the final
// state, which key still holds each lease.
func leaseHistory(ref []event) (revoked map[int64]int64, final map[int64]string) {
	revoked = map[int64]int64{}
	holder := map[string]int64{}
	for i := 0; i < len(ref); {
		j := i
		marker := false
		for j < len(ref) && ref[j].Rev == ref[i].Rev {
			if !ref[j].Deleted && isMarker(ref[j].Key) {
				marker = true
			}
			j++
		}
		for _, e := range ref[i:j] {
			if e.Deleted {
				if l := holder[e.Key]; l != 0 && !marker {
					revoked[l] = e.Rev
				}
				delete(holder, e.Key)
			} else {
				holder[e.Key] = e.Lease
			}
		}
		i = j
	}
	final = map[int64]string{}
	for k, l := range holder {
		if l != 0 {
			final[l] = k
		}
	}
	return revoked, final
}

func isMarker(k string) bool { return strings.HasSuffix(k, "/deleted") }
