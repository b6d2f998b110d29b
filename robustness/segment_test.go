package main

import (
	"fmt"
	"math/rand"
	"testing"

	"github.com/anishathalye/porcupine"
)

// simulate makes a linearizable history of n puts and gets on group 0, in bursts of seven
// overlapping operations with a pause between bursts (where the checker can cut), and the
// store's history to go with it.
func simulate(n int) ([]porcupine.Operation, []event) {
	rnd := rand.New(rand.NewSource(1))
	cur := map[string]string{}
	var rev int64 = 1
	var ops []porcupine.Operation
	var ref []event
	for i := 0; i < n; i++ {
		k := key(0, rnd.Intn(keysPerGroup))
		call := int64(10*i + 100*(i/7))
		if rnd.Intn(2) == 0 {
			rev++
			v := fmt.Sprintf("v%d", i)
			cur[k] = v
			ref = append(ref, event{Rev: rev, Key: k, Value: v})
			ops = append(ops, op(i%4, Input{Op: "put", Keys: []string{k}, Values: []string{v}}, call, call+15, Output{Rev: rev}))
		} else {
			v, ok := cur[k]
			ops = append(ops, op(i%4, Input{Op: "get", Keys: []string{k}}, call, call+15, Output{Values: []string{v}, Exists: []bool{ok}, Rev: rev}))
		}
	}
	return ops, ref
}

func TestALongHistoryIsCheckedInSegmentsThatStillCatchAStaleRead(t *testing.T) {
	ops, ref := simulate(3000)
	seg, stats := segment(ops, ref, segmentOps)
	if stats.Segments < 5 || stats.Largest > segmentOps+7 {
		t.Fatalf("expected several segments of about %d operations: %+v", segmentOps, stats)
	}
	if !porcupine.CheckOperations(model, seg) {
		t.Fatal("the simulated history is linearizable, and so are its segments")
	}
	// Near the end, a read returns the key's first value again: stale by thousands of
	// operations, well past several cuts.
	k := ref[0].Key
	for i := len(ops) - 1; i >= 0; i-- {
		in := ops[i].Input.(Input)
		o := ops[i].Output.(Output)
		if in.Op == "get" && in.Keys[0] == k && o.Values[0] != ref[0].Value {
			ops[i].Output = Output{Values: []string{ref[0].Value}, Exists: []bool{true}, Rev: o.Rev}
			break
		}
	}
	seg, _ = segment(ops, ref, segmentOps)
	if porcupine.CheckOperations(model, seg) {
		t.Fatal("a stale read in a later segment must be caught")
	}
}

func TestASegmentThatCannotEndWhereTheStoreSaysIsAViolation(t *testing.T) {
	k := key(0, 0)
	ops := []porcupine.Operation{
		op(1, Input{Op: "put", Keys: []string{k}, Values: []string{"a"}}, 0, 10, Output{Rev: 2}),
		op(1, Input{Op: "put", Keys: []string{k}, Values: []string{"b"}}, 20, 30, Output{Rev: 3}),
		op(2, Input{Op: "get", Keys: []string{k}}, 40, 50, Output{Values: []string{"b"}, Exists: []bool{true}, Rev: 3}),
	}
	ref := []event{{Rev: 2, Key: k, Value: "a"}, {Rev: 3, Key: k, Value: "b"}}
	seg, stats := segment(ops, ref, 1)
	if stats.Segments != 3 || !porcupine.CheckOperations(model, seg) {
		t.Fatalf("three segments, linearizable: %+v", stats)
	}
	// The store's history says the key held another value after the first put, which nobody
	// wrote. The second segment starts from it and passes (it overwrites the key before
	// reading), so only the first segment's end can catch it.
	ref[0].Value = "forged"
	seg, _ = segment(ops, ref, 1)
	if porcupine.CheckOperations(model, seg) {
		t.Fatal("the join state must be one the segment before can reach")
	}
}

// An indeterminate delete that happened is closed by the first response anywhere at its
// revision or later, possibly another group's, before the group's next cut. The cut's state
// must then include it, so the delete's revision has to count for the cut.
func TestAResolvedDeleteCountsForTheCutItPrecedes(t *testing.T) {
	k, other := key(0, 0), key(1, 0)
	ops := []porcupine.Operation{
		op(1, Input{Op: "put", Group: 0, Keys: []string{k}, Values: []string{"a"}}, 0, 10, Output{Rev: 2}),
		op(2, Input{Op: "delete", Group: 0, Keys: []string{k}, Marker: "m"}, 20, never, Output{Unknown: true}),
		// Group 1 sees revision 3 (the delete's) before group 0's next operation is called.
		op(3, Input{Op: "get", Group: 1, Keys: []string{other}}, 30, 40, Output{Values: []string{""}, Exists: []bool{false}, Rev: 3}),
		op(1, Input{Op: "get", Group: 0, Keys: []string{k}}, 50, 60, Output{Values: []string{""}, Exists: []bool{false}, Rev: 3}),
	}
	ref := []event{{Rev: 2, Key: k, Value: "a"}, {Rev: 3, Key: k, Deleted: true}, {Rev: 3, Key: markerKey(0), Value: "m"}}
	patched, stats := patchHistory(ops, ref, noLeases)
	if stats.Happened != 1 || patched[1].Return != 40 {
		t.Fatalf("the delete happened and returned by 40: %+v %+v", stats, patched[1])
	}
	seg, segs := segment(patched, ref, 1)
	if segs.Segments < 3 {
		t.Fatalf("expected group 0 cut after the delete: %+v", segs)
	}
	if !porcupine.CheckOperations(model, seg) {
		t.Fatal("the history is linearizable")
	}
}
