/* The real node's test workload: a static HTTP/1.0 server on PORT that answers
 *   GET /                    "<name> <pod hostname> uid=<uid>"
 *   GET /write-root          whether it may create a file in / ("root-write=<strerror or ok>")
 *   GET /fetch/<ip>/<port>   what a plain "GET /" to ip:port answers (a pod reaching the host)
 * so a test can tell which pod answered through a Service, that it runs as the user and on the
 * read-only root filesystem the pod declares, and what the pod can reach.
 * Usage: echo-server PORT NAME. One log line per request on stdout (`kubectl logs`). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

/* Connects to ip:port, sends a GET and reads the answer's body into out. */
static void fetch(const char *ip, int port, char *out, size_t cap) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct timeval tv = {.tv_sec = 5};
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) { snprintf(out, cap, "fetch-error=bad address"); close(s); return; }
  if (connect(s, (struct sockaddr *)&a, sizeof a)) { snprintf(out, cap, "fetch-error=%s", strerror(errno)); close(s); return; }
  const char req[] = "GET / HTTP/1.0\r\n\r\n";
  (void)!write(s, req, sizeof req - 1);
  char buf[4096];
  size_t len = 0;
  ssize_t n;
  while (len < sizeof buf - 1 && (n = read(s, buf + len, sizeof buf - 1 - len)) > 0) len += (size_t)n;
  buf[len] = 0;
  close(s);
  char *body = strstr(buf, "\r\n\r\n");
  snprintf(out, cap, "fetched=%s", body ? body + 4 : buf);
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: echo-server PORT NAME\n"); return 2; }
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  signal(SIGPIPE, SIG_IGN);
  char host[256] = "";
  gethostname(host, sizeof host - 1);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                          .sin_addr = {htonl(INADDR_ANY)}};
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) { perror("listen"); return 1; }
  printf("listening on :%s as uid %d\n", argv[1], (int)getuid());
  fflush(stdout);
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) continue;
    char req[2048];
    ssize_t n = read(c, req, sizeof req - 1);
    if (n > 0) {
      req[n] = 0;
      char *eol = strpbrk(req, "\r\n");
      if (eol) *eol = 0;
      printf("request: %s\n", req);
      fflush(stdout);
      char body[4608];
      char ip[64];
      int port;
      if (strncmp(req, "GET /write-root ", 16) == 0) {
        int fd = open("/written-by-echo-server", O_CREAT | O_WRONLY, 0644);
        snprintf(body, sizeof body, "root-write=%s\n", fd < 0 ? strerror(errno) : "ok");
        if (fd >= 0) close(fd);
      } else if (sscanf(req, "GET /fetch/%63[0-9.]/%d ", ip, &port) == 2) {
        fetch(ip, port, body, sizeof body);
      } else {
        snprintf(body, sizeof body, "%s %s uid=%d\n", argv[2], host, (int)getuid());
      }
      char head[128];
      int blen = (int)strlen(body);
      int hlen = snprintf(head, sizeof head,
                          "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n", blen);
      if (write(c, head, hlen) == hlen) (void)!write(c, body, blen);
    }
    close(c);
  }
}
