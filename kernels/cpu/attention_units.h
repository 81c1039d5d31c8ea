// attention_units.h: how attention.c splits a call's work among its threads.
// A unit is (sequence, KV head, tile of consecutive queries): its rows, the tile's queries times
// the KV head's query heads (about TILE_ROWS), share each chunk of CHUNK keys and values
// (CHUNK / BLOCK_TOKENS blocks) while it is in L1. A step of few units (a decode step of few
// sequences: fewer than SPLIT_BELOW per thread) splits each decode unit's keys into segments of
// whole chunks, as flash decoding does, so every thread has work: a segment keeps its rows' sums,
// maximum and total apart (att.segment_sums) for attention.c's merge_segments.
#pragma once
#include "cpu.h"
#include "attention_tiles.h"
#if defined(__AVX512F__) || defined(PYLLM_AVX2)
#define TILE_ROWS 48  // rows per unit: its weights, queries and sums (3 x 12 KB at D = 64 and 16 lanes) stay in L1/L2
#define SPLIT_BELOW 4  // units per thread under which a decode unit's keys are split into segments
#define SEGMENT_CHUNKS 4  // chunks per segment at least: a shorter one costs more to merge than it saves
#define FEW_ROWS 16    // a unit of fewer rows is a decode unit (attend_few)

struct unit {
  int s, g, first, n;  // sequence, KV head, its first query (0 = the sequence's first new token), queries
  int from, to;        // its keys from .. to - 1 (to: the keys its last query sees, or its segment's end)
  int segment, segments;  // its slot in att.segment_sums (-1: all its keys, written straight to out),
                          // and on a unit's first segment how many it has, else 0 (merge_segments)
  long cost;           // rows x keys
};

static int costlier_first(const void *a, const void *b) {
  const long x = ((const struct unit *)a)->cost, y = ((const struct unit *)b)->cost;
  return (x < y) - (x > y);
}

// the call's units into units (NULL: only counted) -> how many; segments: the segment slots they use
static int plan_units(int S, int H, int KV, const int *length, const int *count, struct unit *units, int *segments) {
  const int group = H / KV, tile = TILE_ROWS / group > 0 ? TILE_ROWS / group : 1;  // queries per unit
  int whole = 0;  // units before any split
  for (int s = 0; s < S; s++) whole += (count[s] + tile - 1) / tile * KV;
  const int wanted = SPLIT_BELOW * pool_threads;  // units the split aims for
  int n_units = 0;
  *segments = 0;
  for (int s = 0; s < S; s++)
    for (int first = 0; first < count[s]; first += tile)
      for (int g = 0; g < KV; g++) {
        const int n = count[s] - first < tile ? count[s] - first : tile, keys = length[s] - count[s] + first + n;
        int parts = 1, part_keys = keys;
        if (whole < wanted && n * group < FEW_ROWS) {
          const int chunks = (keys + CHUNK - 1) / CHUNK, per_unit = (wanted + whole - 1) / whole;
          parts = per_unit < chunks / SEGMENT_CHUNKS ? per_unit : chunks / SEGMENT_CHUNKS;
          parts = parts > 1 ? parts : 1;
          part_keys = (chunks + parts - 1) / parts * CHUNK;
          parts = (keys + part_keys - 1) / part_keys;
        }
        for (int i = 0; i < parts; i++, n_units++) {
          const int from = i * part_keys, to = keys - from < part_keys ? keys : from + part_keys;
          if (units != NULL)
            units[n_units] = (struct unit){s, g, first, n, from, to, parts > 1 ? *segments + i : -1,
                                           parts > 1 && i == 0 ? parts : 0, (long)n * (to - from)};
        }
        if (parts > 1) *segments += parts;
      }
  return n_units;
}
#endif
