package main

// Splitting each key group's history into segments porcupine can check one at a time. A whole
// 100-round history holds hundreds of thousands of operations per group; porcupine's cache keys
// every state by a bitset over the group's operations, so its memory grows with the square of
// the history and a long run never finished (24 GB and counting).
//
// A group's history can be cut wherever no operation of the group is in flight: every
// operation before the cut returned before every operation after it was called, so any
// linearization puts the first part before the second. Each part is checked on its own, joined
// by one state S: the part before must be able to end in S (a synthetic "assert" operation
// after its last return demands exactly S), and the part after starts from S (a synthetic
// "init" operation before its first call). Both passing means the two linearizations
// concatenate into one for the whole, so the split is sound whatever S is. S is read off the
// store's history at the highest revision the part before observed; in a correct store that is
// the state the part before ended in, and if it is not, the assert fails and the run reports a
// violation.

import (
	"sort"

	"github.com/anishathalye/porcupine"
)

// segmentOps is the least number of operations in a segment before a cut is taken. Small
// segments check fast; each cut costs two synthetic operations.
const segmentOps = 400

// SegmentStats says how the history was split.
type SegmentStats struct {
	Segments int `json:"segments"`
	Largest  int `json:"largest_segment_ops"`
}

// segment splits ops by group and at quiescent points after at least minOps operations, numbering the segments in Input.Seg,
// and adds the synthetic operations that join them.
func segment(ops []porcupine.Operation, ref []event, minOps int) ([]porcupine.Operation, SegmentStats) {
	byGroup := make([][]porcupine.Operation, groups)
	for _, op := range ops {
		g := op.Input.(Input).Group
		byGroup[g] = append(byGroup[g], op)
	}
	var out []porcupine.Operation
	var stats SegmentStats
	for g, gops := range byGroup {
		if len(gops) == 0 {
			continue
		}
		sort.SliceStable(gops, func(i, j int) bool { return gops[i].Call < gops[j].Call })
		states := newReplay(ref, g)
		seg := stats.Segments
		stats.Segments++
		size := 0
		var maxReturn, maxRev int64
		for i, op := range gops {
			if size >= minOps && maxReturn < op.Call {
				s := states.at(maxRev)
				out = append(out, synthetic("assert", g, seg, s, maxReturn+1, maxReturn+2))
				if size > stats.Largest {
					stats.Largest = size
				}
				seg = stats.Segments
				stats.Segments++
				size = 0
				out = append(out, synthetic("init", g, seg, s, op.Call-2, op.Call-1))
			}
			in := op.Input.(Input)
			in.Seg = seg
			gops[i].Input = in
			out = append(out, gops[i])
			size++
			if op.Return > maxReturn {
				maxReturn = op.Return
			}
			if r := op.Output.(Output).Rev; r > maxRev {
				maxRev = r
			}
		}
		if size > stats.Largest {
			stats.Largest = size
		}
	}
	return out, stats
}

func synthetic(kind string, g, seg int, s state, call, ret int64) porcupine.Operation {
	return porcupine.Operation{ClientId: -1, Input: Input{Op: kind, Group: g, Seg: seg, State: s}, Call: call, Output: Output{}, Return: ret}
}

// replay walks the store's history forward, keeping one group's keys (not its delete marker).
type replay struct {
	ref   []event
	next  int
	group string
	cur   state
}

func newReplay(ref []event, g int) *replay {
	return &replay{ref: ref, group: key(g, 0)[:len(key(g, 0))-len("k0")], cur: state{}}
}

// at is the group's state after every event up to revision rev; rev never decreases between
// calls.
func (r *replay) at(rev int64) state {
	for r.next < len(r.ref) && r.ref[r.next].Rev <= rev {
		e := r.ref[r.next]
		r.next++
		if len(e.Key) < len(r.group) || e.Key[:len(r.group)] != r.group || isMarker(e.Key) {
			continue
		}
		if e.Deleted {
			delete(r.cur, e.Key)
		} else {
			r.cur[e.Key] = entry{Value: e.Value, Lease: e.Lease}
		}
	}
	return r.cur.clone()
}
