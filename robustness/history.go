package main

// A failed check keeps what it checked: the resolved history and the store's history, in
// history.json, so that the check (segments and porcupine) can be run again on exactly that
// history with --recheck, without the cluster.

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/anishathalye/porcupine"
)

type savedOp struct {
	ClientId     int
	Input        Input
	Output       Output
	Call, Return int64
}

type savedHistory struct {
	Ops []savedOp
	Ref []event
}

func saveHistory(path string, ops []porcupine.Operation, ref []event) error {
	s := savedHistory{Ref: ref}
	for _, op := range ops {
		s.Ops = append(s.Ops, savedOp{op.ClientId, op.Input.(Input), op.Output.(Output), op.Call, op.Return})
	}
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// recheck runs the check again on a saved history and says whether it is linearizable.
func recheck(path string, timeout time.Duration) (bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	var s savedHistory
	if err := json.Unmarshal(b, &s); err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	ops := make([]porcupine.Operation, 0, len(s.Ops))
	for _, o := range s.Ops {
		ops = append(ops, porcupine.Operation{ClientId: o.ClientId, Input: o.Input, Output: o.Output, Call: o.Call, Return: o.Return})
	}
	seg, stats := segment(ops, s.Ref, segmentOps)
	res := porcupine.CheckOperationsTimeout(model, seg, timeout)
	fmt.Printf("%d operations in %d segments (largest %d): %v\n", len(ops), stats.Segments, stats.Largest, res)
	if res == porcupine.Unknown {
		return false, fmt.Errorf("porcupine could not decide within %v", timeout)
	}
	return res == porcupine.Ok, nil
}
