package main

import (
	"fmt"
	"testing"

	"github.com/anishathalye/porcupine"
)

func op(client int, in Input, call, ret int64, out Output) porcupine.Operation {
	return porcupine.Operation{ClientId: client, Input: in, Call: call, Output: out, Return: ret}
}

const never = int64(1 << 62)

func noLeases(int64) (bool, error) { return false, nil }

func TestAWriteThatNeverReachedTheStoreIsDroppedAndReadingItIsCaught(t *testing.T) {
	k := key(0, 0)
	ops := []porcupine.Operation{
		op(1, Input{Op: "put", Keys: []string{k}, Values: []string{"a"}}, 0, 10, Output{Rev: 2}),
		op(2, Input{Op: "put", Keys: []string{k}, Values: []string{"lost"}}, 20, never, Output{Unknown: true}),
		// A read after the lost write returns it although the store never had it.
		op(3, Input{Op: "get", Keys: []string{k}}, 30, 40, Output{Values: []string{"lost"}, Exists: []bool{true}, Rev: 2}),
	}
	ref := []event{{Rev: 2, Key: k, Value: "a"}}
	patched, stats := patchHistory(ops, ref, noLeases)
	if stats.NotHappened != 1 || len(patched) != 2 {
		t.Fatalf("the unknown put should be dropped: %+v, %d ops", stats, len(patched))
	}
	if porcupine.CheckOperations(model, patched) {
		t.Fatal("a read of a write that never happened must not be linearizable")
	}
	// Left open-ended, the same history passes: this is what resolving buys.
	if !porcupine.CheckOperations(model, ops) {
		t.Fatal("unresolved, the history is linearizable (the lost write could have happened)")
	}
}

func TestAWriteThatHappenedIsClosedByTheFirstResponseThatSawItsRevision(t *testing.T) {
	k := key(0, 0)
	ops := []porcupine.Operation{
		op(1, Input{Op: "cas", Keys: []string{k}, Values: []string{"b"}, Expect: "a"}, 0, never, Output{Unknown: true}),
		op(2, Input{Op: "get", Keys: []string{k}}, 5, 50, Output{Values: []string{"b"}, Exists: []bool{true}, Rev: 3}),
		op(3, Input{Op: "get", Keys: []string{k}}, 60, 70, Output{Values: []string{"a"}, Exists: []bool{true}, Rev: 3}),
		op(4, Input{Op: "put", Keys: []string{k}, Values: []string{"a"}}, -20, -10, Output{Rev: 2}),
	}
	ref := []event{{Rev: 2, Key: k, Value: "a"}, {Rev: 3, Key: k, Value: "b"}}
	patched, stats := patchHistory(ops, ref, noLeases)
	if stats.Happened != 1 {
		t.Fatalf("the cas happened: %+v", stats)
	}
	if patched[0].Return != 50 || !patched[0].Output.(Output).Succeeded {
		t.Fatalf("the cas returns when revision 3 was first seen and succeeded: %+v", patched[0])
	}
	// The second read, after the swap was visible, sees the key absent: a stale read.
	if porcupine.CheckOperations(model, patched) {
		t.Fatal("a read that misses a write another read already saw must not be linearizable")
	}
	if !porcupine.CheckOperations(model, []porcupine.Operation{patched[0], patched[1], patched[3]}) {
		t.Fatal("without the stale read the history is linearizable")
	}
}

func TestADeleteIsResolvedByItsMarker(t *testing.T) {
	k := key(1, 0)
	ops := []porcupine.Operation{
		op(1, Input{Op: "put", Group: 1, Keys: []string{k}, Values: []string{"a"}}, 0, 10, Output{Rev: 2}),
		op(2, Input{Op: "delete", Group: 1, Keys: []string{k}, Marker: "m1"}, 20, never, Output{Unknown: true}),
		op(3, Input{Op: "delete", Group: 1, Keys: []string{k}, Marker: "m2"}, 20, never, Output{Unknown: true}),
		op(4, Input{Op: "get", Group: 1, Keys: []string{k}}, 30, 40, Output{Values: []string{""}, Exists: []bool{false}, Rev: 3}),
	}
	ref := []event{{Rev: 2, Key: k, Value: "a"}, {Rev: 3, Key: k, Deleted: true}, {Rev: 3, Key: markerKey(1), Value: "m1"}}
	patched, stats := patchHistory(ops, ref, noLeases)
	if stats.Happened != 1 || stats.NotHappened != 1 || len(patched) != 3 || patched[1].Return != 40 {
		t.Fatalf("m1 happened and returned by 40, m2 did not: %+v %+v", stats, patched)
	}
	if !porcupine.CheckOperations(model, patched) {
		t.Fatal("the resolved history is linearizable")
	}
}

func TestAnUnknownRevokeIsResolvedByTheDeletesOfItsKeys(t *testing.T) {
	k0, k1 := key(0, 0), key(0, 1)
	ops := []porcupine.Operation{
		op(1, Input{Op: "lput", Keys: []string{k0}, Values: []string{"a"}, Lease: 9}, 0, 10, Output{Rev: 2}),
		// Lease 7 is alive: its revoke did not happen.
		op(2, Input{Op: "revoke", Lease: 7}, 0, never, Output{Unknown: true}),
		// Lease 8 is gone and nothing held it: it changed nothing.
		op(3, Input{Op: "revoke", Lease: 8}, 0, never, Output{Unknown: true}),
		// Lease 9's key was deleted at revision 4, which wrote no delete marker.
		op(4, Input{Op: "revoke", Lease: 9}, 20, never, Output{Unknown: true}),
		op(5, Input{Op: "put", Keys: []string{k1}, Values: []string{"b"}}, 20, 30, Output{Rev: 3}),
		op(6, Input{Op: "get", Keys: []string{k0}}, 40, 50, Output{Values: []string{""}, Exists: []bool{false}, Rev: 4}),
		// The cluster could not be asked about lease 10.
		op(7, Input{Op: "revoke", Lease: 10}, 0, never, Output{Unknown: true}),
	}
	ref := []event{{Rev: 2, Key: k0, Value: "a", Lease: 9}, {Rev: 3, Key: k1, Value: "b"}, {Rev: 4, Key: k0, Deleted: true}}
	leases := func(id int64) (bool, error) {
		if id == 10 {
			return false, fmt.Errorf("no quorum")
		}
		return id == 7, nil
	}
	patched, stats := patchHistory(ops, ref, leases)
	if stats.NotHappened != 1 || stats.NoEffect != 1 || stats.Happened != 1 || stats.OpenEnded != 1 || len(stats.Problems) != 0 {
		t.Fatalf("7 did not happen, 8 had no effect, 9 happened, 10 stays open: %+v", stats)
	}
	var revoke9 porcupine.Operation
	for _, p := range patched {
		if in := p.Input.(Input); in.Op == "revoke" && in.Lease == 9 {
			revoke9 = p
		}
	}
	if revoke9.Return != 50 || revoke9.Output.(Output).Rev != 4 {
		t.Fatalf("revoke of 9 returns when revision 4 was first seen: %+v", revoke9)
	}
}

func TestALeaseGoneWhileAKeyStillHoldsItIsReported(t *testing.T) {
	k := key(0, 0)
	ops := []porcupine.Operation{
		op(1, Input{Op: "lput", Keys: []string{k}, Values: []string{"a"}, Lease: 9}, 0, 10, Output{Rev: 2}),
		op(2, Input{Op: "revoke", Lease: 9}, 20, never, Output{Unknown: true}),
	}
	_, stats := patchHistory(ops, []event{{Rev: 2, Key: k, Value: "a", Lease: 9}}, noLeases)
	if len(stats.Problems) != 1 {
		t.Fatalf("expected one problem: %+v", stats)
	}
}

func TestAWriteSeenBeforeItWasIssuedIsReported(t *testing.T) {
	k := key(0, 0)
	ops := []porcupine.Operation{
		op(1, Input{Op: "get", Keys: []string{k}}, 0, 5, Output{Values: []string{"x"}, Exists: []bool{true}, Rev: 4}),
		op(2, Input{Op: "put", Keys: []string{k}, Values: []string{"x"}}, 10, never, Output{Unknown: true}),
	}
	_, stats := patchHistory(ops, []event{{Rev: 4, Key: k, Value: "x"}}, noLeases)
	if len(stats.Problems) != 1 {
		t.Fatalf("expected one problem: %+v", stats)
	}
}
