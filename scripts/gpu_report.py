#!/usr/bin/env python3
"""The report of scripts/gpu_check.sh: OUTDIR/report.md and OUTDIR/steps.json from what the check
left in its results folder (the steps, the environment, the benchmarks' JSON lines and the Nsight
Compute exports). Run by gpu_check.sh; by hand on an unpacked results.tar.gz:

  python3 scripts/gpu_report.py --out DIR --results RESULTS [--elapsed S] [--budget S] [--note TEXT]
      [--print]

RESULTS holds logs/steps.tsv, logs/env.txt, raw/*.json and raw/ncu/NAME.{raw,sass}.csv. Every
section is optional: a missing or unreadable input leaves its section out (a profile that cannot
be parsed says so), so the report is always written.
"""
import argparse
import csv
import json
import os
import re
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--out", required=True)
ap.add_argument("--results", required=True)
ap.add_argument("--elapsed", default="?")
ap.add_argument("--budget", default="?")
ap.add_argument("--note", default="")
ap.add_argument("--print", action="store_true", help="print the report too")
a = ap.parse_args()
out, raw = a.out, os.path.join(a.results, "raw")
steps_tsv = os.path.join(a.results, "logs", "steps.tsv")
env_txt = os.path.join(a.results, "logs", "env.txt")
elapsed, budget = a.elapsed, a.budget

def rows(name):
    p = os.path.join(raw, name)
    res = []
    if os.path.exists(p):
        for line in open(p):
            line = line.strip()
            if line.startswith('{'):
                try:
                    res.append(json.loads(line))
                except ValueError:
                    pass
    return res

def read(path):
    try:
        return open(path, errors='replace').read()
    except OSError:
        return ''


steps = [dict(zip(('step', 'status', 'seconds', 'note'), l.split('\t')))
         for l in read(steps_tsv).splitlines() if l.strip()]
json.dump(steps, open(os.path.join(out, 'steps.json'), 'w'), indent=1)
count = {s: sum(1 for x in steps if x['status'] == s) for s in ('PASS', 'FAIL', 'SKIP')}
# The sections whose steps the time budget left out, and the command that runs just those.
SECTION_OF = (('test', 'tests'), ('bench', 'bench'), ('tsp bench', 'bench'), ('tsp init', 'bench'),
              ('profile', 'profile'), ('sanitize', 'sanitize'))
cut = []
for x in steps:
    if x['status'] == 'SKIP' and 'time budget' in x.get('note', ''):
        sec = next((sec for prefix, sec in SECTION_OF if x['step'].startswith(prefix)), None)
        if sec and sec not in cut:
            cut.append(sec)
md = ['# tsp GPU check', '',
      f"{count['PASS']} passed, {count['FAIL']} failed, {count['SKIP']} skipped; "
      f"{elapsed} s of a {budget} s budget."]
if cut:
    md += ['', f"**The time budget left steps of {', '.join(cut)} out**: "
           f"`scripts/gpu_check.sh OUTDIR --only {','.join(cut)}` runs them."]
md += ['', '## Environment', '', '```',
      read(env_txt).rstrip(), '```', '', '## Steps', '',
      '| step | result | s | note |', '|---|---|---:|---|']
for s in steps:
    md.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {s['note'].replace('|', '/')} |")

att = rows('attention.json')
if att:
    md += ['', '## Attention, bf16, causal (TFLOP/s)', '',
           'FLOPs: forward 4·S²·d·hq/2 = 2·S²·d·hq (causal half of QKᵀ and PV), backward 2.5× forward '
           '(FlashAttention\'s convention); fwd+bwd = 7·S²·d·hq over the sum of both times. Target: '
           'tsp ≥ 0.7× PyTorch SDPA (flash) fwd+bwd.', '',
           '| S | hq/hkv | d | flash | tsp fwd | tsp bwd | tsp fwd+bwd | torch fwd | torch bwd | torch fwd+bwd | ratio | ok |',
           '|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|']
    key = lambda r: (r.get('S'), r.get('heads'), r.get('kv_heads'), r.get('head_dim'))
    f = lambda v: f'{v:.1f}' if isinstance(v, (int, float)) else '–'
    ours = [r for r in att if r.get('device', 'cpu') != 'cpu' and r.get('impl', 'tsp') == 'tsp']
    for k, fl in sorted({(key(r), r.get('flash', '')) for r in ours}):
        def tf(impl, p):
            for r in att:
                if key(r) == k and r.get('impl', 'tsp') == impl and r.get('pass') == p and \
                        (impl != 'tsp' or r.get('flash', '') == fl):
                    return r.get('tflops')
            return None
        a, b = tf('tsp', 'fwd+bwd'), tf('torch', 'fwd+bwd')
        ratio = f'{a / b:.2f}×' if a and b else '–'
        oks = [r.get('ok') for r in ours if key(r) == k and r.get('flash', '') == fl and 'ok' in r]
        md.append(f'| {k[0]} | {k[1]}/{k[2]} | {k[3]} | {fl or "–"} | {f(tf("tsp", "forward"))} | '
                  f'{f(tf("tsp", "backward"))} | {f(a)} | {f(tf("torch", "forward"))} | '
                  f'{f(tf("torch", "backward"))} | {f(b)} | {ratio} | '
                  f'{"yes" if oks and all(oks) else "NO" if oks else "–"} |')

# Our rows of attention.json for the same S, flash version, pass and head dim as r: the whole row,
# positions 0..S-1, no documents (what the documents and zigzag tables compare with).
def whole_row(r):
    return [b for b in att if b.get('impl', 'tsp') == 'tsp' and b.get('S') == r.get('S') and
            b.get('flash') == r.get('flash') and b.get('pass') == r.get('pass') and
            b.get('head_dim') == r.get('head_dim') and not b.get('doc_len') and
            not b.get('zigzag')]

docs = rows('attention_docs.json')
if docs:
    md += ['', '## Attention with packed documents, bf16 (flash kernels)', '',
           'Documents of `doc_len` tokens; the work counted is Σ len² instead of S², so the same '
           'TFLOP/s with and without documents means every masked tile is skipped. ideal: the time '
           'ratio S²/Σlen². flash = cudnn: the calls with documents run v1 (not covered), those '
           'without run cuDNN.', '',
           '| S | doc_len | flash | pass | ms with documents | ms without | speed-up | ideal | TFLOP/s | ok |',
           '|---:|---:|---|---|---:|---:|---:|---:|---:|---|']
    for r in docs:
        base = whole_row(r)
        S, L = r.get('S', 0), r.get('doc_len', 0)
        ideal = S * S / (S // L * L * L + (S % L) ** 2) if L else 1
        b = base[0]['ms'] if base else None
        without = '%.3f' % b if b else '–'
        speedup = '%.2f×' % (b / r['ms']) if b else '–'
        md.append(f"| {S} | {L} | {r.get('flash')} | {r.get('pass')} | {r.get('ms'):.3f} | "
                  f"{without} | {speedup} | {ideal:.1f}× | {r.get('tflops')} | "
                  f"{'yes' if r.get('ok') else 'NO'} |")

zz = rows('attention_zigzag.json')
if zz:
    md += ['', '## Attention, one rank of the zigzag layouts (D = 4), bf16', '',
           'Queries: rank 0\'s two chunks (S/4 tokens); keys: all S in the all-gather\'s order. FLOPs '
           'and tokens: that call\'s share (1/D of the row\'s). Against the whole row at the same S '
           '(same flash version): a ratio of TFLOP/s near 1 means the cut costs nothing.', '',
           '| S | flash | pass | ms | TFLOP/s | whole-row TFLOP/s | ratio | ok |',
           '|---:|---|---|---:|---:|---:|---:|---|']
    for r in zz:
        base = whole_row(r)
        b = base[0].get('tflops') if base else None
        md.append(f"| {r.get('S')} | {r.get('flash')} | {r.get('pass')} | {r.get('ms'):.3f} | "
                  f"{r.get('tflops')} | {b if b else '–'} | "
                  f"{'%.2f' % (r['tflops'] / b) if b else '–'} | {'yes' if r.get('ok') else 'NO'} |")

blk = rows('block.json')
if blk:
    md += ['', '## Llama block forward+backward, bf16 (h=4096, I=14336, 32/8 heads, S=8192)', '',
           'Model FLOPs as in bench/block.cpp (6·N·P for the GEMMs + 7·S²·hq·d causal attention). '
           'Targets: tsp ≥ 1.0× PyTorch eager, MFU ≥ 40% of the measured bf16 GEMM rate.', '',
           'recompute: selective recomputes the norms and the MLP gate/up in backward (the layouts\' '
           'default); none keeps them, as PyTorch\'s autograd does. The per-op profile of the none '
           'step is in block_profile.txt.', '',
           '| impl | recompute | ms | tokens/s | TFLOP/s | GEMM TFLOP/s (8192³) | MFU | finite | tsp / PyTorch |',
           '|---|---|---:|---:|---:|---:|---:|---|---:|']
    p = [r for r in blk if r.get('impl') == 'torch']
    for r in blk:
        g = r.get('gemm_tflops')
        vs = (f"**{r['tokens_per_s'] / p[0]['tokens_per_s']:.2f}×**"
              if r.get('impl') == 'tsp' and p and p[0].get('tokens_per_s') else '–')
        md.append(f"| {r.get('impl')} {r.get('attention', '')} | {r.get('recompute', '–')} | "
                  f"{r.get('median_ms')} | {r.get('tokens_per_s')} | "
                  f"{r.get('gflops', 0) / 1000:.1f} | {g if g else '–'} | "
                  f"{(str(round(100 * r['mfu'], 1)) + '%') if r.get('mfu') else '–'} | {r.get('finite')} | {vs} |")

tb = rows('tsp_bench.json')
if tb:
    md += ['', '## tsp bench, one GPU, layout single', '', '```']
    md += [json.dumps(r) for r in tb]
    md += ['```']

# ---- kernel profiles (Nsight Compute exports) ---------------------------------------------------
PROFILES = [('attention_v1', 'tsp flash v1'), ('attention_v2', 'tsp flash v2'),
            ('attention_cudnn', 'tsp through cuDNN'), ('attention_torch', 'PyTorch SDPA flash')]


def number(text):
    """ncu's value text as a float ("1,234.5" included), or None."""
    try:
        return float(str(text).replace(',', ''))
    except ValueError:
        return None


def csv_tables(path, is_header):
    """The tables of an ncu CSV export: a header row (is_header) and the rows after it, up to the
    next header. Lines before the first header (ncu's notes) are skipped."""
    tables = []
    for row in csv.reader(read(path).splitlines()):
        if is_header(row):
            tables.append((row, []))
        elif tables and len(row) == len(tables[-1][0]):
            tables[-1][1].append(row)
    return tables


def launches(path):
    """The raw page: one dict per profiled launch, metric name -> (value text, unit)."""
    res = []
    for head, body in csv_tables(path, lambda r: 'Kernel Name' in r and 'ID' in r):
        units = {}
        for r in body:
            d = dict(zip(head, r))
            if not d.get('ID', '').strip():  # the units row, right after the header
                units = d
                continue
            res.append({k: (v, units.get(k, '')) for k, v in d.items()})
    return res


SCALE = {'n': 1e-9, 'u': 1e-6, 'm': 1e-3, 'K': 1e3, 'M': 1e6, 'G': 1e9}


def value(launch, *names, scale_to=None):
    """The first of `names` (exact names, or re: patterns: the largest match) the launch has, as
    a float; with scale_to ('second' or 'byte'), converted from its unit (nsecond, Kbyte, ...)."""
    for n in names:
        keys = [k for k in launch if re.fullmatch(n[3:], k)] if n.startswith('re:') else \
            [n] if n in launch else []
        vals = []
        for k in keys:
            v, unit = launch[k]
            x = number(v)
            if x is None:
                continue
            if scale_to and unit.endswith(scale_to) and unit != scale_to:
                x *= SCALE.get(unit[0], 1.0)
            vals.append(x)
        if vals:
            return max(vals)
    return None


def stalls(launch, top=3):
    """The top stall reasons: warps stalled per issued instruction by reason (WarpStateStats), or
    else the PC sampling counts, as shares of their sum."""
    for pat in (r'smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio',
                r'smsp__pcsamp_warps_issue_stalled_(\w+)'):
        got = {}
        for k, (v, _) in launch.items():
            m = re.fullmatch(pat, k)
            x = number(v)
            # (selected: the warp issued, not a stall; *_not_issued: a subset of another count)
            if m and x and m.group(1) != 'selected' and not m.group(1).endswith('not_issued'):
                got[m.group(1)] = x
        total = sum(got.values())
        if total > 0:
            best = sorted(got.items(), key=lambda kv: -kv[1])[:top]
            return ', '.join(f'{k} {100 * v / total:.0f}%' for k, v in best)
    return '–'


def sass_hotspots(path, top_ops=6):
    """Per kernel of the SASS source page: the stall samples by opcode (shares)."""
    res = []
    for head, body in csv_tables(path, lambda r: 'Source' in r and 'Address' in r):
        col = next((c for c in head if c.startswith('Warp Stall Sampling (All')), None)
        if col is None:
            continue
        i_src, i_smp = head.index('Source'), head.index(col)
        by_op = {}
        for r in body:
            n = number(r[i_smp]) or 0
            words = [w for w in r[i_src].split() if not w.startswith('@')]
            if n and words:
                op = words[0].split('.')[0]
                by_op[op] = by_op.get(op, 0) + n
        total = sum(by_op.values())
        if total:
            best = sorted(by_op.items(), key=lambda kv: -kv[1])[:top_ops]
            res.append(', '.join(f'{op} {100 * n / total:.0f}%' for op, n in best))
    return res


def f1(x, fmt='{:.1f}'):
    return '–' if x is None else fmt.format(x)


prof_md = []
for name, label in PROFILES:
    rawcsv = os.path.join(raw, 'ncu', name + '.raw.csv')
    if not os.path.exists(rawcsv):
        continue
    try:
        ls = launches(rawcsv)
        hot = sass_hotspots(os.path.join(raw, 'ncu', name + '.sass.csv'))
    except Exception as e:  # the report is written whatever ncu's format turned out to be
        prof_md.append(f'| {label} | could not parse {name}.raw.csv: {e} |' + ' |' * 11)
        continue
    if not ls:
        prof_md.append(f'| {label} | no kernel profiled (see the step\'s log) |' + ' |' * 11)
    for i, l in enumerate(ls):
        kname = l.get('Kernel Name', ('?', ''))[0]
        ms = value(l, 'gpu__time_duration.sum', scale_to='second')
        smem = [value(l, 'launch__shared_mem_per_block_dynamic', scale_to='byte'),
                value(l, 'launch__shared_mem_per_block_static', scale_to='byte')]
        wave = value(l, 'l1tex__data_pipe_lsu_wavefronts_mem_shared.sum')
        conf = value(l, 'l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum')
        local = [value(l, f'l1tex__t_bytes_pipe_lsu_mem_local_op_{o}.sum', scale_to='byte')
                 for o in ('ld', 'st')]
        occ = (f1(value(l, 'sm__warps_active.avg.pct_of_peak_sustained_active'), '{:.0f}') + ' / ' +
               f1(value(l, 'sm__maximum_warps_per_active_cycle_pct'), '{:.0f}'))
        prof_md.append(' | '.join([
            '', label, kname[:48],
            f1(ms * 1e3 if ms is not None else None, '{:.3f}'),
            f1(value(l, 'launch__registers_per_thread'), '{:.0f}'),
            f1(sum(x for x in smem if x) / 1024 if any(smem) else None),
            occ,
            f1(value(l, 'sm__throughput.avg.pct_of_peak_sustained_elapsed'), '{:.0f}'),
            f1(value(l, r're:sm__pipe_tensor\w*_cycles_active\.avg\.pct_of_peak_sustained_active',
                     r're:sm__inst_executed_pipe_tensor\w*\.avg\.pct_of_peak_sustained_active'),
               '{:.0f}'),
            f1(value(l, 'smsp__issue_active.avg.pct_of_peak_sustained_active'), '{:.0f}'),
            f1(value(l, 'l1tex__throughput.avg.pct_of_peak_sustained_active'), '{:.0f}'),
            f1(100 * conf / wave if wave and conf is not None else None, '{:.0f}'),
            f1(sum(x for x in local if x) / 1e6 if any(x is not None for x in local) else None,
               '{:.1f}'),
            stalls(l),
            hot[i] if i < len(hot) else '–', '']).strip())
if prof_md:
    md += ['', '## Attention kernels under Nsight Compute (S = 8192, 32/8 heads, d = 128, bf16, causal)', '',
           'One launch each (the first forward and backward of each implementation), replayed by '
           '`ncu --set full --clock-control none`. occ.: achieved / theoretical occupancy (% of the '
           'SM\'s warps); SM: compute throughput; tensor: tensor-pipe cycles active; issue: issue '
           'slots busy; L1: L1/shared-memory throughput (all % of peak); conflicts: shared-memory '
           'bank conflicts per wavefront; local: spill traffic (MB, loads + stores); stalls: the '
           'largest warp stall reasons; stalled at: the stall samples by SASS opcode. The exports '
           '(details page, every metric, per-instruction SASS) are in results.tar.gz, raw/ncu/.', '',
           '| impl | kernel | ms | regs | smem KB | occ. % | SM % | tensor % | issue % | L1 % | '
           'conflicts % | local MB | stalls | stalled at |',
           '|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|'] + prof_md

if a.note:
    md += ['', a.note]
open(os.path.join(out, 'report.md'), 'w').write('\n'.join(md) + '\n')
if a.print:
    print('\n'.join(md))
