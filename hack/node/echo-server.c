/* The real node's test workload: a static HTTP server that answers every request with
 * "<name> <pod hostname>\n", so a test can tell which pod answered through a Service.
 * Usage: echo-server PORT NAME. Writes nothing to disk (runs on a read-only root filesystem). */
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: echo-server PORT NAME\n"); return 2; }
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  signal(SIGPIPE, SIG_IGN);
  char host[256] = "";
  gethostname(host, sizeof host - 1);
  char body[600];
  int blen = snprintf(body, sizeof body, "%s %s uid=%d\n", argv[2], host, (int)getuid());
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
      printf("request: %s\n", req); /* one log line per request: `kubectl logs` shows it */
      fflush(stdout);
      char head[128];
      int hlen = snprintf(head, sizeof head,
                          "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n", blen);
      if (write(c, head, hlen) == hlen) (void)!write(c, body, blen);
    }
    close(c);
  }
}
