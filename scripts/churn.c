/* Loopback connection churn at full speed, for scripts/bench-churn: connect,
 * accept, close both ends, again, for SECONDS; prints connections per second.
 * The client closes first with SO_LINGER 0 (RST), so no TIME_WAIT socket
 * piles up and the port range never runs dry. Mode "cw": the client first
 * shuts its side down and the server reads the EOF, so every server end
 * passes through CLOSE_WAIT (the tracer's busiest ordinary path).
 *   churn SECONDS [PORT [rst|cw]]   (run inside the benchmark's network namespace) */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 5, t0, end;
	int port = argc > 2 ? atoi(argv[2]) : 18080, one = 1;
	int cw = argc > 3 && !strcmp(argv[3], "cw");
	char buf[16];
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct linger lg = { 1, 0 };
	long n = 0;
	int lst = socket(AF_INET, SOCK_STREAM, 0);

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(lst, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lst, (struct sockaddr *)&addr, sizeof(addr)) || listen(lst, 128)) {
		perror("listen");
		return 1;
	}
	t0 = now();
	end = t0 + seconds;
	while (now() < end) {
		int c = socket(AF_INET, SOCK_STREAM, 0), s;

		if (c < 0 || connect(c, (struct sockaddr *)&addr, sizeof(addr))) {
			perror("connect");
			return 1;
		}
		s = accept(lst, NULL, NULL);
		if (s < 0) {
			perror("accept");
			return 1;
		}
		if (cw) {
			shutdown(c, SHUT_WR);
			if (read(s, buf, sizeof(buf)) != 0) { /* the FIN: s is in CLOSE_WAIT */
				fprintf(stderr, "expected EOF\n");
				return 1;
			}
		}
		setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		close(c);
		close(s);
		n++;
	}
	printf("%.1f\n", n / (now() - t0));
	return 0;
}
