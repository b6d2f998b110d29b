package main

// The checker: porcupine over a model of what the clients do (a register per key, with
// compare-and-swap, delete, atomic two-key writes and reads, keys attached to leases that a
// revoke deletes), history split by key group and into segments (segment.go); and the checks porcupine alone does not make.

import (
	"fmt"
	"sort"
	"strings"

	"github.com/anishathalye/porcupine"
)

type entry struct {
	Value string
	Lease int64
}

// state is one group's keys; absent keys are not in the map. Copied on every step.
type state map[string]entry

func (s state) clone() state {
	n := make(state, len(s))
	for k, v := range s {
		n[k] = v
	}
	return n
}

func step(st interface{}, in interface{}, out interface{}) (bool, interface{}) {
	s := st.(state)
	i := in.(Input)
	o := out.(Output)
	switch i.Op {
	case "put", "lput":
		n := s.clone()
		n[i.Keys[0]] = entry{Value: i.Values[0], Lease: i.Lease}
		return true, n
	case "mput":
		n := s.clone()
		for j, k := range i.Keys {
			n[k] = entry{Value: i.Values[j]}
		}
		return true, n
	case "get", "mget":
		for j, k := range i.Keys {
			e, ok := s[k]
			if ok != o.Exists[j] || (ok && e.Value != o.Values[j]) {
				return false, s
			}
		}
		return true, s
	case "cas":
		e, ok := s[i.Keys[0]]
		holds := ok && e.Value == i.Expect
		if o.Unknown {
			if !holds {
				return true, s
			}
			n := s.clone()
			n[i.Keys[0]] = entry{Value: i.Values[0]}
			return true, n
		}
		if o.Succeeded != holds {
			return false, s
		}
		if holds {
			n := s.clone()
			n[i.Keys[0]] = entry{Value: i.Values[0]}
			return true, n
		}
		if ok != o.Exists[0] || (ok && e.Value != o.Values[0]) {
			return false, s
		}
		return true, s
	case "delete":
		_, ok := s[i.Keys[0]]
		if !o.Unknown && (o.Deleted == 1) != ok {
			return false, s
		}
		n := s.clone()
		delete(n, i.Keys[0])
		return true, n
	case "init":
		return true, i.State.clone()
	case "assert":
		return equalStates(s, i.State), s
	case "revoke":
		n := s.clone()
		for k, e := range n {
			if e.Lease == i.Lease {
				delete(n, k)
			}
		}
		return true, n
	}
	return false, s
}

func equalStates(x, y state) bool {
	if len(x) != len(y) {
		return false
	}
	for k, v := range x {
		if y[k] != v {
			return false
		}
	}
	return true
}

var model = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		var bySeg [][]porcupine.Operation
		for _, op := range history {
			s := op.Input.(Input).Seg
			for len(bySeg) <= s {
				bySeg = append(bySeg, nil)
			}
			bySeg[s] = append(bySeg[s], op)
		}
		return bySeg
	},
	Init:  func() interface{} { return state{} },
	Step:  step,
	Equal: func(a, b interface{}) bool { return equalStates(a.(state), b.(state)) },
	DescribeOperation: func(in, out interface{}) string {
		i, o := in.(Input), out.(Output)
		res := fmt.Sprintf("rev %d", o.Rev)
		if i.Op == "init" || i.Op == "assert" {
			return fmt.Sprintf("%s segment %d: %s", i.Op, i.Seg, describeState(i.State))
		}
		if o.Unknown {
			res = "unknown"
		} else if i.Op == "get" || i.Op == "mget" || (i.Op == "cas" && !o.Succeeded) {
			res = fmt.Sprintf("%v %v", o.Values, o.Exists)
		} else if i.Op == "cas" {
			res = "swapped"
		} else if i.Op == "delete" {
			res = fmt.Sprintf("deleted %d", o.Deleted)
		}
		return fmt.Sprintf("%s %v %v %s lease %x -> %s", i.Op, i.Keys, i.Values, i.Expect, i.Lease, res)
	},
	DescribeState: func(st interface{}) string { return describeState(st.(state)) },
}

func describeState(s state) string {
	keys := make([]string, 0, len(s))
	for k := range s {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s ", k, s[k].Value)
	}
	return b.String()
}

// checkRevisions: every client's response revisions never go backwards.
func checkRevisions(h *History) []string {
	var problems []string
	for c, revs := range h.revs {
		for i := 1; i < len(revs); i++ {
			if revs[i] < revs[i-1] {
				problems = append(problems, fmt.Sprintf("client %d saw revision %d after %d", c, revs[i], revs[i-1]))
				break
			}
		}
	}
	return problems
}

// checkReadValues: no read returns a value no client ever wrote.
func checkReadValues(h *History) []string {
	var problems []string
	for _, op := range h.ops {
		o := op.Output.(Output)
		for j, v := range o.Values {
			if j < len(o.Exists) && o.Exists[j] && !h.values[v] {
				problems = append(problems, fmt.Sprintf("a read returned %q, which nobody wrote", v))
			}
		}
	}
	return problems
}
