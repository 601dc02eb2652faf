/*
 * A fake libnvidia-ml.so.1 for tests: the NVML calls copack uses, with the exact signatures and
 * struct layouts of nvml.h (as mirrored by nvidia-ml-py's pynvml.py), answering from a JSON
 * scenario file instead of hardware.
 *
 * The scenario path comes from the environment variable COPACK_FAKE_NVML_SCENARIO at nvmlInit.
 * The file is re-read whenever its (mtime, size, inode) changes, so a test changes the machine
 * (MIG re-partition, a GPU lost, new metric values, a driver restart) by rewriting it atomically.
 * The scenario format is documented in tests/fakes/nvml/__init__.py.
 *
 * GPM is modelled with counters: each entity (whole GPU, or MIG GPU instance by gpu index and
 * GPU-instance id) integrates its scenario metric values over monotonic time; a GPM sample holds
 * the integrals at the moment it was taken and nvmlGpmMetricsGet returns the time-weighted mean
 * over [sample1, sample2], as real GPM counters do. Samples under 100 ms apart are refused with
 * NVML_ERROR_INVALID_ARGUMENT (real GPM gives meaningless numbers there; the fake makes misuse
 * loud).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* ---------- nvml.h types (layouts as in the real header) ---------- */
typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_ALREADY_INITIALIZED 5
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_LIBRARY_NOT_FOUND 12
#define NVML_ERROR_FUNCTION_NOT_FOUND 13
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_RESET_REQUIRED 16
#define NVML_ERROR_LIB_RM_VERSION_MISMATCH 18
#define NVML_ERROR_MEMORY 20
#define NVML_ERROR_NO_DATA 21
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

struct fake_handle;
typedef struct fake_handle *nvmlDevice_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
#define nvmlMemory_v2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2 << 24U)))

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    unsigned int gpuInstanceSliceCount;
    unsigned int computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

struct fake_gpm_sample;
typedef struct fake_gpm_sample *nvmlGpmSample_t;

typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    struct {
        char *shortName;
        char *longName;
        char *unit;
    } metricInfo;
} nvmlGpmMetric_t;

typedef struct {
    unsigned int version;
    unsigned int numMetrics;
    nvmlGpmSample_t sample1;
    nvmlGpmSample_t sample2;
    nvmlGpmMetric_t metrics[]; /* NVML_GPM_METRIC_MAX in the header; only numMetrics are touched */
} nvmlGpmMetricsGet_t;
#define NVML_GPM_METRICS_GET_VERSION 1
/* The smallest NVML_GPM_METRIC_MAX any header shipped (R520): callers must stay below it. */
#define FAKE_GPM_MAX_METRICS 98

typedef struct {
    unsigned int version;
    unsigned int isSupportedDevice;
} nvmlGpmSupport_t;
#define NVML_GPM_SUPPORT_VERSION 1

/* ---------- a small JSON reader ---------- */
enum jtype { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };
typedef struct jval {
    enum jtype t;
    double num;
    int b;
    char *str;
    struct jval **items; /* array items or object values */
    char **keys;         /* object keys */
    int n;
} jval;

typedef struct {
    const char *s;
    const char *err;
} jparser;

static void jskip(jparser *p) {
    while (*p->s && isspace((unsigned char)*p->s)) p->s++;
}

static jval *jnew(enum jtype t) {
    jval *v = calloc(1, sizeof(jval));
    v->t = t;
    return v;
}

static void jfree(jval *v) {
    if (!v) return;
    for (int i = 0; i < v->n; i++) {
        jfree(v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->str);
    free(v);
}

static jval *jparse_value(jparser *p, int depth);

static char *jparse_string(jparser *p) {
    if (*p->s != '"') {
        p->err = "expected a string";
        return NULL;
    }
    p->s++;
    size_t cap = 32, len = 0;
    char *out = malloc(cap);
    while (*p->s && *p->s != '"') {
        char c = *p->s++;
        if (c == '\\') {
            char e = *p->s++;
            switch (e) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u':
                /* Non-ASCII escapes are not needed by scenarios: keep a placeholder. */
                for (int i = 0; i < 4 && *p->s; i++) p->s++;
                c = '?';
                break;
            case '\0': p->err = "unterminated escape"; free(out); return NULL;
            default: c = e;
            }
        }
        if (len + 2 > cap) out = realloc(out, cap *= 2);
        out[len++] = c;
    }
    if (*p->s != '"') {
        p->err = "unterminated string";
        free(out);
        return NULL;
    }
    p->s++;
    out[len] = 0;
    return out;
}

static jval *jparse_value(jparser *p, int depth) {
    if (depth > 64) {
        p->err = "nesting too deep";
        return NULL;
    }
    jskip(p);
    char c = *p->s;
    if (c == '{' || c == '[') {
        int obj = c == '{';
        jval *v = jnew(obj ? J_OBJ : J_ARR);
        int cap = 8;
        v->items = calloc(cap, sizeof(jval *));
        if (obj) v->keys = calloc(cap, sizeof(char *));
        p->s++;
        jskip(p);
        if (*p->s == (obj ? '}' : ']')) {
            p->s++;
            return v;
        }
        for (;;) {
            char *key = NULL;
            if (obj) {
                jskip(p);
                key = jparse_string(p);
                if (!key) { jfree(v); return NULL; }
                jskip(p);
                if (*p->s != ':') { p->err = "expected ':'"; free(key); jfree(v); return NULL; }
                p->s++;
            }
            jval *item = jparse_value(p, depth + 1);
            if (!item) { free(key); jfree(v); return NULL; }
            if (v->n == cap) {
                cap *= 2;
                v->items = realloc(v->items, cap * sizeof(jval *));
                if (obj) v->keys = realloc(v->keys, cap * sizeof(char *));
            }
            v->items[v->n] = item;
            if (obj) v->keys[v->n] = key;
            v->n++;
            jskip(p);
            if (*p->s == ',') { p->s++; continue; }
            if (*p->s == (obj ? '}' : ']')) { p->s++; return v; }
            p->err = obj ? "expected ',' or '}'" : "expected ',' or ']'";
            jfree(v);
            return NULL;
        }
    }
    if (c == '"') {
        char *s = jparse_string(p);
        if (!s) return NULL;
        jval *v = jnew(J_STR);
        v->str = s;
        return v;
    }
    if (!strncmp(p->s, "true", 4)) { p->s += 4; jval *v = jnew(J_BOOL); v->b = 1; return v; }
    if (!strncmp(p->s, "false", 5)) { p->s += 5; return jnew(J_BOOL); }
    if (!strncmp(p->s, "null", 4)) { p->s += 4; return jnew(J_NULL); }
    if (!strncmp(p->s, "NaN", 3)) { p->s += 3; jval *v = jnew(J_NUM); v->num = NAN; return v; }
    char *end;
    errno = 0;
    double d = strtod(p->s, &end);
    if (end == p->s) {
        p->err = "unexpected character";
        return NULL;
    }
    p->s = end;
    jval *v = jnew(J_NUM);
    v->num = d;
    return v;
}

static jval *jget(const jval *o, const char *key) {
    if (!o || o->t != J_OBJ) return NULL;
    for (int i = 0; i < o->n; i++)
        if (!strcmp(o->keys[i], key)) return o->items[i];
    return NULL;
}

/* A number, or NaN spelled as the string "nan"/"NaN" (JSON has no NaN). */
static double jnum(const jval *o, const char *key, double dflt) {
    jval *v = jget(o, key);
    if (!v) return dflt;
    if (v->t == J_NUM) return v->num;
    if (v->t == J_STR && !strcasecmp(v->str, "nan")) return NAN;
    if (v->t == J_BOOL) return v->b;
    return dflt;
}

static void jstrcpy(char *dst, size_t cap, const jval *o, const char *key, const char *dflt) {
    jval *v = jget(o, key);
    const char *src = (v && v->t == J_STR) ? v->str : dflt;
    snprintf(dst, cap, "%s", src ? src : "");
}

/* ---------- the scenario ---------- */
#define MAX_GPUS 16
#define MAX_MIG 8
#define MAX_GI_ID 32
#define MAX_STEPS 64
#define MAX_ERRS 16
#define NMETRICS 4

static const unsigned int metric_ids[NMETRICS] = {2, 3, 5, 10};
static const char *metric_keys[NMETRICS] = {"sm_util", "sm_occupancy", "any_tensor_util",
                                            "dram_bw_util"};
static char *metric_long[NMETRICS] = {"SM utilization", "SM occupancy", "Any tensor utilization",
                                      "DRAM bandwidth utilization"};
static char *metric_short[NMETRICS] = {"sm_util", "sm_occupancy", "any_tensor_util",
                                       "dram_bw_util"};
static char percent_unit[] = "%";

typedef struct {
    char func[64];
    int code;
} fake_err;

typedef struct {
    int n;
    fake_err e[MAX_ERRS];
} err_list;

typedef struct {
    double t;            /* seconds since the scenario generation was loaded */
    double v[NMETRICS];  /* percent 0..100, NaN allowed */
} gpm_step;

typedef struct {
    int nsteps;
    gpm_step steps[MAX_STEPS];
    int metric_ret[NMETRICS]; /* per-metric nvmlReturn to report */
} gpm_timeline;

typedef struct {
    int present;
    char uuid[96];
    char name[96];
    unsigned int gi_id, ci_id;
    unsigned int sm_count, gi_slices, ci_slices;
    unsigned long long memory_mb;
    unsigned long long mem_total, mem_used, mem_reserved;
    gpm_timeline gpm;
    err_list errs;
} fake_mig;

typedef struct {
    char uuid[96];
    char name[96];
    int lost;
    int mig_capable, mig_enabled, mig_pending;
    unsigned int max_mig;
    fake_mig mig[MAX_MIG];
    unsigned long long mem_total, mem_used, mem_reserved;
    unsigned int util_gpu, util_mem;
    int util_supported;
    int gpm_supported;
    unsigned int num_cores;
    int cc_major, cc_minor;
    unsigned int minor;
    gpm_timeline gpm;
    err_list errs;
} fake_gpu;

typedef struct {
    int init_error;
    int driver_loaded;
    long long driver_epoch;
    int stale_error;
    char driver_version[80];
    int ngpus;
    fake_gpu gpus[MAX_GPUS];
    err_list errs;
    double loaded_at; /* monotonic seconds when this generation was read */
} scenario;

struct fake_handle {
    int is_mig;
    int gpu;
    int slot;
};

struct fake_gpm_sample {
    unsigned int magic;
    int filled;
    int gpu;
    int gi_id; /* -1: whole GPU */
    double t;
    double acc[NMETRICS];
    double nan_s[NMETRICS]; /* seconds with a NaN value so far: a diff over them is NaN */
};
#define SAMPLE_MAGIC 0x47504d53u

typedef struct {
    double last_t;
    double acc[NMETRICS];
    double nan_s[NMETRICS];
    int started;
} gpm_counter;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static scenario *cur;
static int init_count;
static long long init_epoch;
static char scenario_path[4096];
static struct stat scenario_stat;
static char load_error[4700];
static struct fake_handle gpu_handles[MAX_GPUS];
static struct fake_handle mig_handles[MAX_GPUS][MAX_MIG];
static gpm_counter gpu_counters[MAX_GPUS];
static gpm_counter gi_counters[MAX_GPUS][MAX_GI_ID + 1];
static long live_samples;

/* Per-function call counters, read by tests through fakeNvmlCallCount. */
#define MAX_COUNTED 64
static struct {
    const char *name;
    long count;
} call_counts[MAX_COUNTED];

static void count_call(const char *name) {
    for (int i = 0; i < MAX_COUNTED; i++) {
        if (!call_counts[i].name) {
            call_counts[i].name = name;
            call_counts[i].count = 1;
            return;
        }
        if (!strcmp(call_counts[i].name, name)) {
            call_counts[i].count++;
            return;
        }
    }
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const struct {
    const char *name;
    int code;
} err_names[] = {
    {"SUCCESS", 0}, {"UNINITIALIZED", 1}, {"INVALID_ARGUMENT", 2}, {"NOT_SUPPORTED", 3},
    {"NO_PERMISSION", 4}, {"ALREADY_INITIALIZED", 5}, {"NOT_FOUND", 6},
    {"INSUFFICIENT_SIZE", 7}, {"INSUFFICIENT_POWER", 8}, {"DRIVER_NOT_LOADED", 9},
    {"TIMEOUT", 10}, {"IRQ_ISSUE", 11}, {"LIBRARY_NOT_FOUND", 12}, {"FUNCTION_NOT_FOUND", 13},
    {"CORRUPTED_INFOROM", 14}, {"GPU_IS_LOST", 15}, {"RESET_REQUIRED", 16},
    {"OPERATING_SYSTEM", 17}, {"LIB_RM_VERSION_MISMATCH", 18}, {"IN_USE", 19}, {"MEMORY", 20},
    {"NO_DATA", 21}, {"VGPU_ECC_NOT_SUPPORTED", 22}, {"INSUFFICIENT_RESOURCES", 23},
    {"FREQ_NOT_SUPPORTED", 24}, {"ARGUMENT_VERSION_MISMATCH", 25}, {"DEPRECATED", 26},
    {"NOT_READY", 27}, {"GPU_NOT_FOUND", 28}, {"INVALID_STATE", 29}, {"UNKNOWN", 999},
};

static int err_code(const jval *v, int dflt) {
    if (!v) return dflt;
    if (v->t == J_NUM) return (int)v->num;
    if (v->t == J_STR) {
        const char *s = v->str;
        if (!strncmp(s, "NVML_ERROR_", 11)) s += 11;
        for (size_t i = 0; i < sizeof(err_names) / sizeof(err_names[0]); i++)
            if (!strcasecmp(err_names[i].name, s)) return err_names[i].code;
        return NVML_ERROR_UNKNOWN;
    }
    return dflt;
}

static void read_errs(err_list *out, const jval *o) {
    jval *e = jget(o, "errors");
    out->n = 0;
    if (!e || e->t != J_OBJ) return;
    for (int i = 0; i < e->n && out->n < MAX_ERRS; i++) {
        snprintf(out->e[out->n].func, sizeof(out->e[0].func), "%s", e->keys[i]);
        out->e[out->n].code = err_code(e->items[i], NVML_ERROR_UNKNOWN);
        out->n++;
    }
}

/* "nvmlDeviceGetCount_v2" matches an injection keyed "nvmlDeviceGetCount" too. */
static int err_lookup(const err_list *l, const char *func) {
    size_t flen = strlen(func);
    if (flen > 3 && !strcmp(func + flen - 3, "_v2")) flen -= 3;
    for (int i = 0; i < l->n; i++) {
        if (strlen(l->e[i].func) == flen && !strncmp(l->e[i].func, func, flen))
            return l->e[i].code;
        if (!strcmp(l->e[i].func, func)) return l->e[i].code;
    }
    return NVML_SUCCESS;
}

static void read_gpm(gpm_timeline *g, const jval *o) {
    memset(g, 0, sizeof(*g));
    jval *gpm = jget(o, "gpm");
    if (gpm && gpm->t == J_OBJ) {
        g->nsteps = 1;
        g->steps[0].t = 0;
        for (int m = 0; m < NMETRICS; m++) g->steps[0].v[m] = jnum(gpm, metric_keys[m], 0);
    } else if (gpm && gpm->t == J_ARR) {
        for (int i = 0; i < gpm->n && g->nsteps < MAX_STEPS; i++) {
            gpm_step *s = &g->steps[g->nsteps++];
            s->t = jnum(gpm->items[i], "t", 0);
            for (int m = 0; m < NMETRICS; m++) s->v[m] = jnum(gpm->items[i], metric_keys[m], 0);
        }
    }
    jval *errs = jget(o, "gpm_errors");
    for (int m = 0; m < NMETRICS; m++) g->metric_ret[m] = err_code(jget(errs, metric_keys[m]), 0);
}

static void read_memory(const jval *o, unsigned long long *total, unsigned long long *used,
                        unsigned long long *reserved) {
    *total = (unsigned long long)jnum(o, "memory_total", 0);
    *used = (unsigned long long)jnum(o, "memory_used", 0);
    *reserved = (unsigned long long)jnum(o, "memory_reserved", 0);
}

static scenario *parse_scenario(const char *text, char *err, size_t errcap) {
    jparser p = {text, NULL};
    jval *root = jparse_value(&p, 0);
    if (!root || root->t != J_OBJ) {
        snprintf(err, errcap, "scenario is not a JSON object: %s at offset %ld",
                 p.err ? p.err : "wrong type", (long)(p.s - text));
        jfree(root);
        return NULL;
    }
    scenario *sc = calloc(1, sizeof(scenario));
    sc->init_error = err_code(jget(root, "init_error"), NVML_SUCCESS);
    sc->driver_loaded = (int)jnum(root, "driver_loaded", 1);
    sc->driver_epoch = (long long)jnum(root, "driver_epoch", 0);
    sc->stale_error = err_code(jget(root, "stale_session_error"), NVML_ERROR_UNINITIALIZED);
    jstrcpy(sc->driver_version, sizeof(sc->driver_version), root, "driver_version",
            "550.54.15");
    read_errs(&sc->errs, root);
    jval *gpus = jget(root, "gpus");
    for (int i = 0; gpus && gpus->t == J_ARR && i < gpus->n && i < MAX_GPUS; i++) {
        jval *g = gpus->items[i];
        fake_gpu *fg = &sc->gpus[sc->ngpus++];
        char dflt_uuid[96];
        snprintf(dflt_uuid, sizeof dflt_uuid, "GPU-00000000-0000-0000-0000-%012d", i);
        jstrcpy(fg->uuid, sizeof fg->uuid, g, "uuid", dflt_uuid);
        jstrcpy(fg->name, sizeof fg->name, g, "name", "NVIDIA H100 80GB HBM3");
        fg->lost = (int)jnum(g, "lost", 0);
        read_memory(g, &fg->mem_total, &fg->mem_used, &fg->mem_reserved);
        jval *util = jget(g, "utilization");
        fg->util_supported = util != NULL && util->t == J_OBJ;
        fg->util_gpu = (unsigned)jnum(util, "gpu", 0);
        fg->util_mem = (unsigned)jnum(util, "memory", 0);
        fg->gpm_supported = (int)jnum(g, "gpm_supported", 0);
        fg->num_cores = (unsigned)jnum(g, "num_cores", 0);
        fg->cc_major = (int)jnum(g, "cc_major", 9);
        fg->cc_minor = (int)jnum(g, "cc_minor", 0);
        fg->minor = (unsigned)jnum(g, "minor_number", i);
        read_gpm(&fg->gpm, g);
        read_errs(&fg->errs, g);
        jval *mig = jget(g, "mig");
        fg->mig_capable = (int)jnum(g, "mig_capable", mig != NULL);
        if (mig && mig->t == J_OBJ) {
            fg->mig_enabled = (int)jnum(mig, "enabled", 1);
            fg->mig_pending = (int)jnum(mig, "pending", fg->mig_enabled);
            fg->max_mig = (unsigned)jnum(mig, "max_devices", 7);
            jval *devs = jget(mig, "devices");
            for (int k = 0; devs && devs->t == J_ARR && k < devs->n; k++) {
                jval *d = devs->items[k];
                int slot = (int)jnum(d, "slot", k);
                if (slot < 0 || slot >= MAX_MIG) continue;
                fake_mig *fm = &fg->mig[slot];
                fm->present = 1;
                char dflt_mig[96];
                snprintf(dflt_mig, sizeof dflt_mig, "MIG-00000000-0000-0000-%04d-%012d", i, slot);
                jstrcpy(fm->uuid, sizeof fm->uuid, d, "uuid", dflt_mig);
                jstrcpy(fm->name, sizeof fm->name, d, "name", fg->name);
                fm->gi_id = (unsigned)jnum(d, "gi_id", slot + 1);
                fm->ci_id = (unsigned)jnum(d, "ci_id", 0);
                fm->sm_count = (unsigned)jnum(d, "sm_count", 16);
                fm->gi_slices = (unsigned)jnum(d, "gi_slices", 1);
                fm->ci_slices = (unsigned)jnum(d, "ci_slices", fm->gi_slices);
                fm->memory_mb = (unsigned long long)jnum(d, "memory_mb", 0);
                read_memory(d, &fm->mem_total, &fm->mem_used, &fm->mem_reserved);
                read_gpm(&fm->gpm, d);
                read_errs(&fm->errs, d);
            }
        }
    }
    jfree(root);
    return sc;
}

/* Integral of one metric of a timeline over [a, b] (seconds since the generation started);
 * time spent on NaN values goes to *nan_time instead. */
static double integrate(const gpm_timeline *g, int m, double a, double b, double *nan_time) {
    if (g->nsteps == 0 || b <= a) return 0;
    double total = 0;
    for (int i = 0; i < g->nsteps; i++) {
        double lo = i == 0 ? -INFINITY : g->steps[i].t;
        double hi = i + 1 < g->nsteps ? g->steps[i + 1].t : INFINITY;
        double x0 = a > lo ? a : lo, x1 = b < hi ? b : hi;
        if (x1 <= x0) continue;
        if (isnan(g->steps[i].v[m]))
            *nan_time += x1 - x0;
        else
            total += g->steps[i].v[m] * (x1 - x0);
    }
    return total;
}

static void advance(gpm_counter *c, const gpm_timeline *g, double now) {
    if (!c->started) {
        c->started = 1;
        c->last_t = now;
        return;
    }
    if (g && now > c->last_t) {
        double a = c->last_t - cur->loaded_at, b = now - cur->loaded_at;
        for (int m = 0; m < NMETRICS; m++) c->acc[m] += integrate(g, m, a, b, &c->nan_s[m]);
    }
    c->last_t = now;
}

static void advance_all(double now) {
    if (!cur) return;
    for (int i = 0; i < cur->ngpus; i++) {
        if (gpu_counters[i].started) advance(&gpu_counters[i], &cur->gpus[i].gpm, now);
        for (int s = 0; s < MAX_MIG; s++) {
            fake_mig *fm = &cur->gpus[i].mig[s];
            if (fm->present && fm->gi_id <= MAX_GI_ID && gi_counters[i][fm->gi_id].started)
                advance(&gi_counters[i][fm->gi_id], &fm->gpm, now);
        }
    }
}

/* Re-reads the scenario file when it changed. Returns an error code for the caller. */
static int refresh(void) {
    struct stat st;
    if (stat(scenario_path, &st) != 0) {
        if (cur) return NVML_SUCCESS; /* keep the last good machine while a writer swaps files */
        snprintf(load_error, sizeof load_error, "cannot stat scenario %s: %s", scenario_path,
                 strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    if (cur && st.st_mtim.tv_sec == scenario_stat.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == scenario_stat.st_mtim.tv_nsec && st.st_size == scenario_stat.st_size &&
        st.st_ino == scenario_stat.st_ino)
        return NVML_SUCCESS;
    FILE *f = fopen(scenario_path, "rb");
    if (!f) return cur ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
    char *buf = malloc(st.st_size + 1);
    size_t n = fread(buf, 1, st.st_size, f);
    fclose(f);
    buf[n] = 0;
    char err[256];
    scenario *sc = parse_scenario(buf, err, sizeof err);
    free(buf);
    if (!sc) {
        snprintf(load_error, sizeof load_error, "%s: %s", scenario_path, err);
        fprintf(stderr, "fake NVML: %s\n", load_error);
        return cur ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
    }
    double now = mono();
    advance_all(now); /* close the old generation's counters with the old values */
    free(cur);
    cur = sc;
    cur->loaded_at = now;
    scenario_stat = st;
    return NVML_SUCCESS;
}

/* Common prologue: counts the call, checks init state, the driver and injected errors. */
static int enter(const char *func) {
    count_call(func);
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    int r = refresh();
    if (r) return r;
    if (!cur->driver_loaded) return NVML_ERROR_DRIVER_NOT_LOADED;
    if (cur->driver_epoch != init_epoch) return cur->stale_error;
    return err_lookup(&cur->errs, func);
}

static fake_gpu *gpu_of(nvmlDevice_t h) {
    if (!h || h->gpu < 0 || h->gpu >= cur->ngpus) return NULL;
    return &cur->gpus[h->gpu];
}

/* Resolves a handle against the current scenario; NULL with *rc set when it is unusable. */
static int check_handle(nvmlDevice_t h, const char *func, fake_gpu **g, fake_mig **m) {
    int in_table = (h >= &gpu_handles[0] && h < &gpu_handles[MAX_GPUS]) ||
                   (h >= &mig_handles[0][0] && h < &mig_handles[0][0] + MAX_GPUS * MAX_MIG);
    if (!in_table) return NVML_ERROR_INVALID_ARGUMENT;
    *g = gpu_of(h);
    if (!*g) return NVML_ERROR_INVALID_ARGUMENT;
    if ((*g)->lost) return NVML_ERROR_GPU_IS_LOST;
    int r = err_lookup(&(*g)->errs, func);
    if (r) return r;
    if (m) *m = NULL;
    if (h->is_mig) {
        fake_mig *fm = &(*g)->mig[h->slot];
        if (!(*g)->mig_enabled || !fm->present) return NVML_ERROR_INVALID_ARGUMENT;
        r = err_lookup(&fm->errs, func);
        if (r) return r;
        if (m) *m = fm;
    }
    return NVML_SUCCESS;
}

#define ENTER()                                                                 \
    int rc__;                                                                   \
    pthread_mutex_lock(&lock);                                                  \
    if ((rc__ = enter(__func__))) { pthread_mutex_unlock(&lock); return rc__; }
#define RETURN(x)                 \
    do {                          \
        int r__ = (x);            \
        pthread_mutex_unlock(&lock); \
        return r__;               \
    } while (0)
#define HANDLE(h, g, m)                                                          \
    fake_gpu *g = NULL;                                                          \
    fake_mig *m = NULL;                                                          \
    if ((rc__ = check_handle(h, __func__, &g, &m))) RETURN(rc__);                \
    (void)m;

/* ---------- init / shutdown ---------- */
static nvmlReturn_t do_init(const char *func) {
    pthread_mutex_lock(&lock);
    count_call(func);
    const char *p = getenv("COPACK_FAKE_NVML_SCENARIO");
    if (!p || !*p) {
        fprintf(stderr, "fake NVML: COPACK_FAKE_NVML_SCENARIO is not set\n");
        RETURN(NVML_ERROR_LIBRARY_NOT_FOUND);
    }
    if (strcmp(p, scenario_path) != 0) {
        /* Another scenario file is another machine: its GPM counters start from zero. */
        snprintf(scenario_path, sizeof scenario_path, "%s", p);
        free(cur);
        cur = NULL;
        memset(&scenario_stat, 0, sizeof scenario_stat);
        memset(gpu_counters, 0, sizeof gpu_counters);
        memset(gi_counters, 0, sizeof gi_counters);
    }
    int r = refresh();
    if (r) {
        fprintf(stderr, "fake NVML: %s\n", load_error);
        RETURN(r);
    }
    if (cur->init_error) RETURN(cur->init_error);
    if (!cur->driver_loaded) RETURN(NVML_ERROR_DRIVER_NOT_LOADED);
    if (init_count == 0) init_epoch = cur->driver_epoch;
    if (init_epoch != cur->driver_epoch) {
        /* A restarted driver: a fresh session, as after nvmlShutdown + nvmlInit. */
        init_epoch = cur->driver_epoch;
    }
    init_count++;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return do_init(__func__);
}
nvmlReturn_t nvmlInit_v2(void) { return do_init(__func__); }
nvmlReturn_t nvmlInit(void) { return do_init(__func__); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    count_call(__func__);
    if (init_count <= 0) RETURN(NVML_ERROR_UNINITIALIZED);
    init_count--;
    RETURN(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t result) {
    for (size_t i = 0; i < sizeof(err_names) / sizeof(err_names[0]); i++)
        if (err_names[i].code == result) {
            static __thread char buf[64];
            snprintf(buf, sizeof buf, "fake NVML: %s", err_names[i].name);
            return buf;
        }
    return "fake NVML: unknown error";
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER();
    if (!version) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (strlen(cur->driver_version) + 1 > length) RETURN(NVML_ERROR_INSUFFICIENT_SIZE);
    strcpy(version, cur->driver_version);
    RETURN(NVML_SUCCESS);
}

/* ---------- enumeration ---------- */
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER();
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *count = cur->ngpus; /* a lost GPU is still counted */
    RETURN(NVML_SUCCESS);
}
nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    ENTER();
    if (!device || index >= (unsigned)cur->ngpus) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    fake_gpu *g = &cur->gpus[index];
    if (g->lost) RETURN(NVML_ERROR_GPU_IS_LOST);
    int r = err_lookup(&g->errs, __func__);
    if (r) RETURN(r);
    gpu_handles[index] = (struct fake_handle){0, (int)index, -1};
    *device = &gpu_handles[index];
    RETURN(NVML_SUCCESS);
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    ENTER();
    if (!uuid || !device) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < cur->ngpus; i++) {
        fake_gpu *g = &cur->gpus[i];
        if (!strcmp(g->uuid, uuid)) {
            if (g->lost) RETURN(NVML_ERROR_GPU_IS_LOST);
            gpu_handles[i] = (struct fake_handle){0, i, -1};
            *device = &gpu_handles[i];
            RETURN(NVML_SUCCESS);
        }
        for (int s = 0; g->mig_enabled && s < MAX_MIG; s++)
            if (g->mig[s].present && !strcmp(g->mig[s].uuid, uuid)) {
                if (g->lost) RETURN(NVML_ERROR_GPU_IS_LOST);
                mig_handles[i][s] = (struct fake_handle){1, i, s};
                *device = &mig_handles[i][s];
                RETURN(NVML_SUCCESS);
            }
    }
    RETURN(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    ENTER();
    HANDLE(device, g, m);
    if (!index) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (device->is_mig) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *index = device->gpu;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor) {
    ENTER();
    HANDLE(device, g, m);
    if (!minor) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (device->is_mig) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *minor = g->minor;
    RETURN(NVML_SUCCESS);
}

static int copy_str(char *dst, unsigned int length, const char *src) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    ENTER();
    HANDLE(device, g, m);
    RETURN(copy_str(uuid, length, m ? m->uuid : g->uuid));
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    ENTER();
    HANDLE(device, g, m);
    RETURN(copy_str(name, length, m ? m->name : g->name));
}

nvmlReturn_t nvmlDeviceGetNumGpuCores(nvmlDevice_t device, unsigned int *numCores) {
    ENTER();
    HANDLE(device, g, m);
    if (!numCores) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (m || g->num_cores == 0) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *numCores = g->num_cores;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor) {
    ENTER();
    HANDLE(device, g, m);
    if (!major || !minor) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *major = g->cc_major;
    *minor = g->cc_minor;
    RETURN(NVML_SUCCESS);
}

/* ---------- memory and utilization ---------- */
static void mem_of(fake_gpu *g, fake_mig *m, unsigned long long *total, unsigned long long *used,
                   unsigned long long *reserved) {
    *total = m ? m->mem_total : g->mem_total;
    *used = m ? m->mem_used : g->mem_used;
    *reserved = m ? m->mem_reserved : g->mem_reserved;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    ENTER();
    HANDLE(device, g, m);
    if (!memory) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    unsigned long long total, used, reserved;
    mem_of(g, m, &total, &used, &reserved);
    /* v1 counts driver-reserved memory as used (the trap FACTS.md describes). */
    memory->total = total;
    memory->used = used + reserved;
    memory->free = total > used + reserved ? total - used - reserved : 0;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    ENTER();
    HANDLE(device, g, m);
    if (!memory) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (memory->version != nvmlMemory_v2) RETURN(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    unsigned long long total, used, reserved;
    mem_of(g, m, &total, &used, &reserved);
    memory->total = total;
    memory->reserved = reserved;
    memory->used = used;
    memory->free = total > used + reserved ? total - used - reserved : 0;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    ENTER();
    HANDLE(device, g, m);
    if (!utilization) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    /* Not supported on MIG devices, nor on a GPU in MIG mode. */
    if (m || g->mig_enabled || !g->util_supported) RETURN(NVML_ERROR_NOT_SUPPORTED);
    utilization->gpu = g->util_gpu;
    utilization->memory = g->util_mem;
    RETURN(NVML_SUCCESS);
}

/* ---------- MIG ---------- */
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                  unsigned int *pendingMode) {
    ENTER();
    HANDLE(device, g, m);
    if (!currentMode || !pendingMode) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (m || !g->mig_capable) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *currentMode = g->mig_enabled;
    *pendingMode = g->mig_pending;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice) {
    ENTER();
    HANDLE(device, g, m);
    if (!isMigDevice) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    *isMigDevice = m != NULL;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    ENTER();
    HANDLE(device, g, m);
    if (!count) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (m) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *count = g->mig_enabled ? g->max_mig : 0;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                 nvmlDevice_t *migDevice) {
    ENTER();
    HANDLE(device, g, m);
    if (!migDevice || m) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->mig_enabled) RETURN(NVML_ERROR_NOT_SUPPORTED);
    if (index >= g->max_mig || index >= MAX_MIG) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->mig[index].present) RETURN(NVML_ERROR_NOT_FOUND);
    int r = err_lookup(&g->mig[index].errs, __func__);
    if (r) RETURN(r);
    mig_handles[device->gpu][index] = (struct fake_handle){1, device->gpu, (int)index};
    *migDevice = &mig_handles[device->gpu][index];
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice,
                                                          nvmlDevice_t *device) {
    ENTER();
    HANDLE(migDevice, g, m);
    if (!device || !m) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    gpu_handles[migDevice->gpu] = (struct fake_handle){0, migDevice->gpu, -1};
    *device = &gpu_handles[migDevice->gpu];
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    ENTER();
    HANDLE(device, g, m);
    if (!id) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!m) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *id = m->gi_id;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id) {
    ENTER();
    HANDLE(device, g, m);
    if (!id) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!m) RETURN(NVML_ERROR_NOT_SUPPORTED);
    *id = m->ci_id;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes) {
    ENTER();
    HANDLE(device, g, m);
    if (!attributes) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!m) RETURN(NVML_ERROR_NOT_SUPPORTED); /* "currently only supports MIG device handles" */
    memset(attributes, 0, sizeof(*attributes));
    attributes->multiprocessorCount = m->sm_count;
    attributes->gpuInstanceSliceCount = m->gi_slices;
    attributes->computeInstanceSliceCount = m->ci_slices;
    attributes->memorySizeMB = m->memory_mb;
    attributes->sharedCopyEngineCount = m->gi_slices;
    RETURN(NVML_SUCCESS);
}
nvmlReturn_t nvmlDeviceGetAttributes(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes) {
    return nvmlDeviceGetAttributes_v2(device, attributes);
}

/* ---------- GPM ---------- */
nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t device, nvmlGpmSupport_t *gpmSupport) {
    ENTER();
    HANDLE(device, g, m);
    if (!gpmSupport) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (gpmSupport->version != NVML_GPM_SUPPORT_VERSION)
        RETURN(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    /* Succeeds with isSupportedDevice = 0 on pre-Hopper GPUs. */
    gpmSupport->isSupportedDevice = g->gpm_supported ? 1 : 0;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *gpmSample) {
    ENTER();
    if (!gpmSample) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    struct fake_gpm_sample *s = calloc(1, sizeof(*s));
    if (!s) RETURN(NVML_ERROR_MEMORY);
    s->magic = SAMPLE_MAGIC;
    live_samples++;
    *gpmSample = s;
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t gpmSample) {
    /* Freeing must work even after the driver went away, so no enter() checks. */
    pthread_mutex_lock(&lock);
    count_call(__func__);
    if (!gpmSample || gpmSample->magic != SAMPLE_MAGIC) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    gpmSample->magic = 0;
    free(gpmSample);
    live_samples--;
    RETURN(NVML_SUCCESS);
}

static void fill_sample(nvmlGpmSample_t s, gpm_counter *c, const gpm_timeline *g, int gpu,
                        int gi_id) {
    double now = mono();
    advance(c, g, now);
    s->filled = 1;
    s->gpu = gpu;
    s->gi_id = gi_id;
    s->t = now;
    memcpy(s->acc, c->acc, sizeof(s->acc));
    memcpy(s->nan_s, c->nan_s, sizeof(s->nan_s));
}

nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t device, nvmlGpmSample_t gpmSample) {
    ENTER();
    HANDLE(device, g, m);
    if (!gpmSample || gpmSample->magic != SAMPLE_MAGIC) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->gpm_supported) RETURN(NVML_ERROR_NOT_SUPPORTED);
    if (m) RETURN(NVML_ERROR_NOT_SUPPORTED); /* MIG instances go through nvmlGpmMigSampleGet */
    fill_sample(gpmSample, &gpu_counters[device->gpu], &g->gpm, device->gpu, -1);
    RETURN(NVML_SUCCESS);
}

nvmlReturn_t nvmlGpmMigSampleGet(nvmlDevice_t device, unsigned int gpuInstanceId,
                                 nvmlGpmSample_t gpmSample) {
    ENTER();
    HANDLE(device, g, m);
    if (!gpmSample || gpmSample->magic != SAMPLE_MAGIC || m) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->gpm_supported) RETURN(NVML_ERROR_NOT_SUPPORTED);
    if (!g->mig_enabled) RETURN(NVML_ERROR_NOT_SUPPORTED);
    fake_mig *fm = NULL;
    for (int s = 0; s < MAX_MIG; s++)
        if (g->mig[s].present && g->mig[s].gi_id == gpuInstanceId) fm = &g->mig[s];
    if (!fm || gpuInstanceId > MAX_GI_ID) RETURN(NVML_ERROR_NOT_FOUND);
    int r = err_lookup(&fm->errs, __func__);
    if (r) RETURN(r);
    fill_sample(gpmSample, &gi_counters[device->gpu][gpuInstanceId], &fm->gpm, device->gpu,
                (int)gpuInstanceId);
    RETURN(NVML_SUCCESS);
}

static const gpm_timeline *timeline_of(int gpu, int gi_id) {
    if (gpu < 0 || gpu >= cur->ngpus) return NULL;
    fake_gpu *g = &cur->gpus[gpu];
    if (gi_id < 0) return &g->gpm;
    for (int s = 0; s < MAX_MIG; s++)
        if (g->mig[s].present && (int)g->mig[s].gi_id == gi_id) return &g->mig[s].gpm;
    return NULL;
}

nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *metricsGet) {
    ENTER();
    if (!metricsGet) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (metricsGet->version != NVML_GPM_METRICS_GET_VERSION)
        RETURN(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (metricsGet->numMetrics == 0 || metricsGet->numMetrics > FAKE_GPM_MAX_METRICS)
        RETURN(NVML_ERROR_INVALID_ARGUMENT);
    nvmlGpmSample_t s1 = metricsGet->sample1, s2 = metricsGet->sample2;
    if (!s1 || !s2 || s1->magic != SAMPLE_MAGIC || s2->magic != SAMPLE_MAGIC || !s1->filled ||
        !s2->filled)
        RETURN(NVML_ERROR_INVALID_ARGUMENT);
    if (s1->gpu != s2->gpu || s1->gi_id != s2->gi_id) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    double dt = s2->t - s1->t;
    if (dt < 0.1) RETURN(NVML_ERROR_INVALID_ARGUMENT);
    const gpm_timeline *tl = timeline_of(s1->gpu, s1->gi_id);
    for (unsigned i = 0; i < metricsGet->numMetrics; i++) {
        nvmlGpmMetric_t *mt = &metricsGet->metrics[i];
        int idx = -1;
        for (int k = 0; k < NMETRICS; k++)
            if (metric_ids[k] == mt->metricId) idx = k;
        mt->value = 0;
        mt->metricInfo.shortName = mt->metricInfo.longName = mt->metricInfo.unit = NULL;
        if (idx < 0) {
            mt->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            continue;
        }
        mt->metricInfo.shortName = metric_short[idx];
        mt->metricInfo.longName = metric_long[idx];
        mt->metricInfo.unit = percent_unit;
        if (tl && tl->metric_ret[idx]) {
            mt->nvmlReturn = tl->metric_ret[idx];
            continue;
        }
        mt->nvmlReturn = NVML_SUCCESS;
        mt->value = s2->nan_s[idx] != s1->nan_s[idx] ? NAN : (s2->acc[idx] - s1->acc[idx]) / dt;
    }
    RETURN(NVML_SUCCESS);
}

/* ---------- test hooks (not part of NVML) ---------- */
long fakeNvmlLiveSamples(void) {
    pthread_mutex_lock(&lock);
    long n = live_samples;
    pthread_mutex_unlock(&lock);
    return n;
}

long fakeNvmlCallCount(const char *name) {
    long n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_COUNTED && call_counts[i].name; i++)
        if (!strcmp(call_counts[i].name, name)) n = call_counts[i].count;
    pthread_mutex_unlock(&lock);
    return n;
}

void fakeNvmlResetCounts(void) {
    pthread_mutex_lock(&lock);
    memset(call_counts, 0, sizeof call_counts);
    pthread_mutex_unlock(&lock);
}

int fakeNvmlInitCount(void) { return init_count; }
