/*
 * dovecot_nodelay.so: LD_PRELOAD shim removing the fixed 500 ms delay stock
 * Dovecot 2.3 waits before telling IDLE clients about new mail.
 *
 * lib-storage/mailbox-watch.c arms that delay with
 * timeout_add_short(NOTIFY_DELAY_MSECS, ...); the macro passes __FILE__, so
 * the caller is recognisable.  We interpose timeout_add_short() and run
 * exactly that timer on the next ioloop round (0 ms); every other timer keeps
 * its duration.  Dovecot itself is untouched: without the shim it only is
 * slower.  Loaded through `import_environment = LD_PRELOAD=...` in
 * dovecot.conf, because Dovecot scrubs its children's environment.
 *
 * Build: gcc -O2 -shared -fPIC -o dovecot_nodelay.so nodelay.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>

struct timeout;
struct ioloop;
typedef void timeout_callback_t(void *context);

typedef struct timeout *add_short_fn(unsigned int msecs, const char *source_filename,
                                     unsigned int source_linenum,
                                     timeout_callback_t *callback, void *context);

static int is_watch_delay(const char *source_filename)
{
    return source_filename != NULL && strstr(source_filename, "mailbox-watch.c") != NULL;
}

struct timeout *timeout_add_short(unsigned int msecs, const char *source_filename,
                                  unsigned int source_linenum,
                                  timeout_callback_t *callback, void *context)
{
    static add_short_fn *next;

    if (next == NULL)
        next = (add_short_fn *)dlsym(RTLD_NEXT, "timeout_add_short");
    if (is_watch_delay(source_filename))
        msecs = 0;
    return next(msecs, source_filename, source_linenum, callback, context);
}
